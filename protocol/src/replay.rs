//! Whether a replayed input may supersede the letter it names (pure).
//!
//! A replay names its letter three ways: the marker's sequence in the input
//! stream (`Orderpipeline-Replay-Of: <marker>/<letter>`), the input stream's
//! identity (its creation time: sequences restart when a stream is deleted and
//! created again, so a sequence alone can name another order's marker), and the
//! key of the order (`Orderpipeline-Replay-Key`). It supersedes the marker only
//! when all three agree with what the stream holds and with the replayed order
//! itself; otherwise it is refused and handled as an ordinary input: it gets its
//! own key's outcome, and the letter stays in the dead-letter stream.

use crate::keys::OutcomeKind;

/// What a replayed input claims, from its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub marker: u64,
    pub letter: u64,
    /// `Orderpipeline-Replay-Stream`; absent on replays by older orderctls.
    pub stream_created: Option<u128>,
    /// `Orderpipeline-Replay-Key`; absent on replays by older orderctls.
    pub key: Option<String>,
}

/// Why a replay was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The letter's marker was in an earlier stream of the same name.
    OtherStream { named: u128, current: u128 },
    /// The named sequence holds something else than a dead-letter outcome.
    NotALetter,
    /// The marker is the letter of another key than the one the replay names.
    OtherMarker { named: String, marker: String },
    /// The replayed order is another order than the letter's.
    OtherOrder { order: String, marker: String },
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::OtherStream { .. } => "other_stream",
            Refusal::NotALetter => "not_a_letter",
            Refusal::OtherMarker { .. } => "other_marker",
            Refusal::OtherOrder { .. } => "other_order",
        }
    }

    /// One sentence for the log: what was wrong and what happens instead.
    pub fn describe(&self, c: &Claim) -> String {
        let what = match self {
            Refusal::OtherStream { named, current } => format!(
                "its letter's marker {} was in an earlier stream of the same name (created {named} ns, this one {current} ns): that sequence now holds another input",
                c.marker
            ),
            Refusal::NotALetter => format!("sequence {} holds no dead letter", c.marker),
            Refusal::OtherMarker { named, marker } => format!(
                "it replays the letter of key {named}, but sequence {} is the letter of key {marker}",
                c.marker
            ),
            Refusal::OtherOrder { order, marker } => format!(
                "the replayed order has key {order}, but sequence {} is the letter of key {marker}",
                c.marker
            ),
        };
        format!(
            "replay of dead letter {} refused: {what}; handled as an ordinary input, the letter stays",
            c.letter
        )
    }
}

/// What the input stream holds at the sequence a replay names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtMarker<'a> {
    /// Nothing any more (aged out, removed, purged).
    Nothing,
    /// An outcome of this pipeline: its kind and key.
    Outcome(OutcomeKind, &'a str),
    /// Anything else (an input, another subject).
    Other,
}

/// Judges a replay against the input stream's identity (`current_stream`), what
/// the stream holds at the named marker, and the replayed order's own key
/// (`order_key`, when it has a usable id).
///
/// `Ok(Some(key))`: a replay of the letter of `key`. `Ok(None)`: the marker is
/// gone (aged out or removed), nothing is left to supersede: an ordinary input.
pub fn judge(
    claim: &Claim,
    current_stream: u128,
    marker: AtMarker<'_>,
    order_key: Option<&str>,
) -> Result<Option<String>, Refusal> {
    if let Some(named) = claim.stream_created
        && named != current_stream
    {
        return Err(Refusal::OtherStream {
            named,
            current: current_stream,
        });
    }
    let marker_key = match marker {
        AtMarker::Nothing => return Ok(None),
        AtMarker::Outcome(OutcomeKind::DeadLettered, key) => key,
        AtMarker::Outcome(..) | AtMarker::Other => return Err(Refusal::NotALetter),
    };
    if let Some(named) = claim.key.as_deref()
        && named != marker_key
    {
        return Err(Refusal::OtherMarker {
            named: named.into(),
            marker: marker_key.into(),
        });
    }
    if let Some(order) = order_key
        && order != marker_key
    {
        return Err(Refusal::OtherOrder {
            order: order.into(),
            marker: marker_key.into(),
        });
    }
    Ok(Some(marker_key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutcomeKind::{DeadLettered, Processed};

    fn d(key: &str) -> AtMarker<'_> {
        AtMarker::Outcome(DeadLettered, key)
    }

    fn claim(stream: Option<u128>, key: Option<&str>) -> Claim {
        Claim {
            marker: 2,
            letter: 9,
            stream_created: stream,
            key: key.map(str::to_string),
        }
    }

    #[test]
    fn a_replay_of_its_own_letter_supersedes_it() {
        let c = claim(Some(100), Some("A"));
        assert_eq!(judge(&c, 100, d("A"), Some("A")), Ok(Some("A".into())));
        // An undecodable letter's order has no key of its own.
        let c = claim(Some(100), Some("=100-1"));
        assert_eq!(judge(&c, 100, d("=100-1"), None), Ok(Some("=100-1".into())));
        // A replay by an older orderctl names no stream and no key.
        assert_eq!(
            judge(&claim(None, None), 100, d("A"), Some("A")),
            Ok(Some("A".into()))
        );
    }

    #[test]
    fn a_vanished_marker_leaves_nothing_to_supersede() {
        assert_eq!(
            judge(
                &claim(Some(100), Some("A")),
                100,
                AtMarker::Nothing,
                Some("A")
            ),
            Ok(None)
        );
    }

    #[test]
    fn each_refusal() {
        let cases = [
            // The stream was recreated: sequence 2 is now B's marker.
            (
                claim(Some(100), Some("A")),
                d("B"),
                Some("A"),
                Refusal::OtherStream {
                    named: 100,
                    current: 200,
                },
            ),
            (
                claim(None, None),
                AtMarker::Outcome(Processed, "A"),
                Some("A"),
                Refusal::NotALetter,
            ),
            // A forged header naming another order's real marker.
            (
                claim(None, Some("A")),
                d("B"),
                Some("A"),
                Refusal::OtherMarker {
                    named: "A".into(),
                    marker: "B".into(),
                },
            ),
            (
                claim(None, None),
                d("B"),
                Some("A"),
                Refusal::OtherOrder {
                    order: "A".into(),
                    marker: "B".into(),
                },
            ),
        ];
        for (c, marker, order, want) in cases {
            let got = judge(&c, 200, marker, order);
            assert_eq!(got, Err(want.clone()), "{c:?}");
            assert!(want.describe(&c).contains("handled as an ordinary input"));
            assert!(!want.label().is_empty());
        }
    }
}
