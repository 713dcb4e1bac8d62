//! The promise, stated once: what a key's outcome chain may look like.
//!
//! Every input's key gets outcome messages `<prefix>.<kind>.<key>` in the input
//! stream; read oldest first they form the key's chain. The promise holds for a
//! chain when
//!
//! 1. it holds at most one *final* outcome (processed or rejected): an order is
//!    never processed twice, nor processed and rejected;
//! 2. its first outcome was written over nothing (the write expected no outcome);
//! 3. every later outcome was written over the outcome just before it, and that
//!    one is a dead letter: only the replay of a dead letter supersedes it.
//!
//! The model checker (`tests/model.rs`) checks this on every state it explores,
//! `orderctl audit` on every chain it reads back from a real stream, and the
//! worker's tests on the chains its handler writes. (That each stored input has
//! a chain at all is the other half of the promise, "nothing lost": the model
//! and the audit check it against the inputs they know of.)

use crate::keys::OutcomeKind;

/// One outcome in a key's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    /// Its sequence in the input stream.
    pub seq: u64,
    pub kind: OutcomeKind,
    /// The outcome its write named as the key's last one (a replay names the
    /// dead-letter marker it supersedes); `None` when it expected no outcome.
    pub supersedes: Option<u64>,
}

/// A way a chain breaks the promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Breach {
    /// More than one processed-or-rejected outcome.
    TwoFinals { finals: usize },
    /// The first outcome names an earlier one the chain does not hold.
    FirstSupersedes { first: Link },
    /// `later` follows `earlier` without being the replay of `earlier`'s dead letter.
    BadSupersede { earlier: Link, later: Link },
}

impl Breach {
    /// One sentence, for logs and the audit.
    pub fn describe(&self) -> String {
        match self {
            Breach::TwoFinals { finals } => {
                format!("{finals} processed-or-rejected outcomes")
            }
            Breach::FirstSupersedes { first } => format!(
                "{} {} supersedes {:?}, which the chain does not hold",
                first.kind.token(),
                first.seq,
                first.supersedes
            ),
            Breach::BadSupersede { earlier, later } => format!(
                "{} {} then {} {}",
                earlier.kind.token(),
                earlier.seq,
                later.kind.token(),
                later.seq
            ),
        }
    }
}

/// How many processed-or-rejected outcomes a chain holds (`kept` copies are
/// not outcomes of their own).
pub fn finals(chain: &[Link]) -> usize {
    chain
        .iter()
        .filter(|l| matches!(l.kind, OutcomeKind::Processed | OutcomeKind::Rejected))
        .count()
}

/// Whether `later` may follow `earlier` in a chain: the replay of `earlier`'s
/// dead letter, or a `kept` copy of `earlier`, a final or kept outcome.
fn may_follow(earlier: Link, later: Link) -> bool {
    let over = later.supersedes == Some(earlier.seq);
    match (earlier.kind, later.kind) {
        (OutcomeKind::DeadLettered, OutcomeKind::Kept) => false,
        (OutcomeKind::DeadLettered, _) => over,
        (_, OutcomeKind::Kept) => over,
        _ => false,
    }
}

/// The breaches of one key's chain (oldest first); empty when the promise holds.
pub fn check_chain(chain: &[Link]) -> Vec<Breach> {
    let mut out = Vec::new();
    let n = finals(chain);
    if n > 1 {
        out.push(Breach::TwoFinals { finals: n });
    }
    if let Some(first) = chain.first()
        && first.supersedes.is_some()
    {
        out.push(Breach::FirstSupersedes { first: *first });
    }
    for w in chain.windows(2) {
        let (earlier, later) = (w[0], w[1]);
        if !may_follow(earlier, later) {
            out.push(Breach::BadSupersede { earlier, later });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutcomeKind::{DeadLettered as D, Kept as K, Processed as P, Rejected as R};

    fn l(seq: u64, kind: OutcomeKind, supersedes: Option<u64>) -> Link {
        Link {
            seq,
            kind,
            supersedes,
        }
    }

    #[test]
    fn sound_chains_hold() {
        for chain in [
            vec![],
            vec![l(3, P, None)],
            vec![l(3, R, None)],
            vec![l(3, D, None)],
            vec![l(3, D, None), l(9, P, Some(3))],
            vec![l(3, D, None), l(9, D, Some(3)), l(12, R, Some(9))],
            vec![l(3, P, None), l(9, K, Some(3)), l(14, K, Some(9))],
            vec![l(3, D, None), l(9, P, Some(3)), l(12, K, Some(9))],
        ] {
            assert_eq!(check_chain(&chain), vec![], "{chain:?}");
        }
    }

    #[test]
    fn each_breach_fires() {
        let cases: Vec<(Vec<Link>, Vec<Breach>)> = vec![
            (
                vec![l(3, P, None), l(5, P, Some(3))],
                vec![
                    Breach::TwoFinals { finals: 2 },
                    Breach::BadSupersede {
                        earlier: l(3, P, None),
                        later: l(5, P, Some(3)),
                    },
                ],
            ),
            (
                vec![l(3, P, Some(1))],
                vec![Breach::FirstSupersedes {
                    first: l(3, P, Some(1)),
                }],
            ),
            (
                // A replay naming another marker than the letter before it.
                vec![l(3, D, None), l(9, P, Some(2))],
                vec![Breach::BadSupersede {
                    earlier: l(3, D, None),
                    later: l(9, P, Some(2)),
                }],
            ),
            (
                // An ordinary write after a dead letter (no replay).
                vec![l(3, D, None), l(9, R, None)],
                vec![Breach::BadSupersede {
                    earlier: l(3, D, None),
                    later: l(9, R, None),
                }],
            ),
            (
                // A dead letter "kept": it would be a second letter.
                vec![l(3, D, None), l(9, K, Some(3))],
                vec![Breach::BadSupersede {
                    earlier: l(3, D, None),
                    later: l(9, K, Some(3)),
                }],
            ),
            (
                // A kept copy written over another outcome than the one before it.
                vec![l(3, P, None), l(9, K, Some(2))],
                vec![Breach::BadSupersede {
                    earlier: l(3, P, None),
                    later: l(9, K, Some(2)),
                }],
            ),
            (
                // A final outcome after a kept one: the order's second.
                vec![l(3, P, None), l(9, K, Some(3)), l(12, P, Some(9))],
                vec![
                    Breach::TwoFinals { finals: 2 },
                    Breach::BadSupersede {
                        earlier: l(9, K, Some(3)),
                        later: l(12, P, Some(9)),
                    },
                ],
            ),
        ];
        for (chain, want) in cases {
            assert_eq!(check_chain(&chain), want, "{chain:?}");
            for b in &want {
                assert!(!b.describe().is_empty());
            }
        }
    }
}
