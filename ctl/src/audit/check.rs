//! The audit's judgement, pure: the records read back from a pipeline
//! ([`super::read`]) in, the violations of the promise out. The chains are
//! judged by [`orderpipeline_protocol::promise`], the one statement of the
//! promise that the model checker uses too; the rest (nothing lost, nothing
//! without an input, no stale letter, nothing stranded) is about the inputs and
//! the dead-letter stream, which only the audit sees.

use std::collections::{BTreeMap, HashMap, HashSet};

use orderpipeline_common::names::OutcomeKind;
use orderpipeline_proto::DeadLetter;
use orderpipeline_protocol::promise::{self, Breach, Link};

/// One outcome message as stored in the input stream.
#[derive(Clone, Debug)]
pub struct StoredOutcome {
    pub seq: u64,
    pub kind: OutcomeKind,
    pub key: String,
    /// The input whose delivery wrote it.
    pub input_seq: Option<u64>,
    /// The outcome it was written over: a replay's dead-letter marker, a kept
    /// copy's original.
    pub replay_of: Option<u64>,
    /// For a kept copy: the kind of the outcome it keeps.
    pub keeps: Option<OutcomeKind>,
    /// The order id in the event (empty for undecodable inputs).
    pub order_id: String,
    /// When the stream stored it.
    pub stored_at: std::time::SystemTime,
}

/// One input message as stored.
#[derive(Clone, Debug)]
pub struct StoredInput {
    pub seq: u64,
    /// "" when undecodable.
    pub order_id: String,
    /// The keys its outcome may be under: the order key (when the id is usable)
    /// and always the position key (undecodable, oversized, unusable id).
    pub keys: Vec<String>,
    pub replay_of: Option<u64>,
    /// When the stream stored it.
    pub stored_at: std::time::SystemTime,
}

/// Every input and outcome in the streams, for exactly-once assertions.
#[derive(Debug, Default)]
pub struct Audit {
    /// order id -> number of OrderProcessed events
    pub processed: HashMap<String, u32>,
    pub rejected: HashMap<String, u32>,
    /// original stream sequence -> current dead letters (outcomes not superseded)
    pub dead_letters: HashMap<u64, Vec<DeadLetter>>,
    pub stored_inputs: Vec<StoredInput>,
    /// key -> its outcomes, oldest first
    pub chains: BTreeMap<String, Vec<StoredOutcome>>,
    /// Dead letters in the DLQ stream: (DLQ sequence, marker sequence in the input stream).
    pub letters: Vec<(u64, Option<u64>)>,
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
    /// The input stream's first sequence: everything below it has been removed
    /// (aged out by `maxAge`, a limit, a purge). Outcomes whose inputs are below
    /// it, and letters whose markers are, are archived, not violations.
    pub first_seq: u64,
    /// Inputs with no v2 outcome whose order the protocol before v2 recorded
    /// final in its KV bucket (see [`Audit::honour_legacy_records`]).
    pub legacy_final: HashSet<u64>,
    /// Inputs whose order has both a final record before v2 and a v2 outcome:
    /// two outcomes.
    pub legacy_and_v2: Vec<u64>,
}

impl StoredOutcome {
    /// The order's outcome this message stands for: its own kind, or for a
    /// kept copy the kind it keeps.
    pub fn outcome_kind(&self) -> OutcomeKind {
        self.keeps.unwrap_or(self.kind)
    }

    /// The outcome as a link of its key's chain.
    pub fn link(&self) -> Link {
        Link {
            seq: self.seq,
            kind: self.kind,
            supersedes: self.replay_of,
        }
    }
}

fn links(chain: &[StoredOutcome]) -> Vec<Link> {
    chain.iter().map(StoredOutcome::link).collect()
}

/// A key's chain as the violations print it: `key: [(seq, kind), ...]`.
fn chain_line(key: &str, chain: &[StoredOutcome]) -> String {
    let kinds: Vec<_> = chain.iter().map(|o| (o.seq, o.kind.token())).collect();
    format!("{key}: {kinds:?}")
}

/// How many processed-or-rejected outcomes a chain holds.
fn finals(chain: &[StoredOutcome]) -> usize {
    promise::finals(&links(chain))
}

/// One kind of violation and its instances.
struct Found {
    what: &'static str,
    items: Vec<String>,
}

impl Found {
    fn new(what: &'static str, items: Vec<String>) -> Self {
        Self { what, items }
    }
}

impl Audit {
    /// Counts each chain's current outcome (and any earlier final ones, which
    /// are second outcomes the checks report); `dead` holds the dead letters
    /// read from the markers, by marker sequence.
    pub fn tally(&mut self, mut dead: HashMap<u64, DeadLetter>) {
        let superseded = self.superseded();
        for chain in self.chains.values() {
            let Some(last) = chain.last() else { continue };
            if last.kind == OutcomeKind::DeadLettered
                && !superseded.contains(&last.seq)
                && let Some(d) = dead.remove(&last.seq)
            {
                self.dead_letters
                    .entry(d.original_stream_sequence)
                    .or_default()
                    .push(d);
            }
            // A kept copy counts only when the outcome it keeps aged out (it
            // is then the order's one outcome in the stream).
            let own_final = finals(chain) > 0;
            for o in chain {
                let kind = match o.kind {
                    OutcomeKind::Kept if !own_final => o.outcome_kind(),
                    k => k,
                };
                match kind {
                    OutcomeKind::Processed => {
                        *self.processed.entry(o.order_id.clone()).or_default() += 1
                    }
                    OutcomeKind::Rejected => {
                        *self.rejected.entry(o.order_id.clone()).or_default() += 1
                    }
                    OutcomeKind::DeadLettered | OutcomeKind::Kept => {}
                }
            }
        }
    }

    /// The dead-letter markers a replay's outcome names: superseded (under the
    /// same key, or under the replay's own key when the letter had no usable id).
    fn superseded(&self) -> HashSet<u64> {
        self.chains
            .values()
            .flatten()
            .filter_map(|o| o.replay_of)
            .collect()
    }

    /// Whether an input has its outcome (v2, or a final record before v2).
    fn has_outcome(&self, input: &StoredInput) -> bool {
        self.outcome_of(input).is_some() || self.legacy_final.contains(&input.seq)
    }

    /// The current outcome of an input: the last of its key's chain.
    /// A replay's outcome is under the key of the marker it names.
    pub fn outcome_of(&self, input: &StoredInput) -> Option<&StoredOutcome> {
        if let Some(marker) = input.replay_of
            && let Some(chain) = self
                .chains
                .values()
                .find(|c| c.iter().any(|o| o.seq == marker))
        {
            return chain.last();
        }
        input
            .keys
            .iter()
            .find_map(|k| self.chains.get(k).and_then(|c| c.last()))
    }

    /// Problems with the promise, each a sentence; empty when it holds.
    pub fn violations(&self) -> Vec<String> {
        let mut found = self.chain_breaches();
        found.insert(
            1,
            Found::new(
                "inputs with a final record before v2 and a v2 outcome (two outcomes)",
                self.legacy_and_v2
                    .iter()
                    .map(|s| format!("seq {s}"))
                    .collect(),
            ),
        );
        found.push(self.lost());
        found.push(self.orphan_outcomes());
        found.extend(self.letter_problems());
        let mut out: Vec<String> = found
            .into_iter()
            .filter(|f| !f.items.is_empty())
            .map(|f| {
                let n = f.items.len();
                let some: Vec<_> = f.items.into_iter().take(5).collect();
                format!("{}: {n}, e.g. {some:?}", f.what)
            })
            .collect();
        if self.consumer_pending + self.consumer_ack_pending > 0 {
            out.push(format!(
                "stranded: the consumer still holds pending {} ack-pending {}",
                self.consumer_pending, self.consumer_ack_pending
            ));
        }
        out
    }

    /// Keys whose chain holds more than one processed-or-rejected outcome
    /// (kept copies are not outcomes of their own), with their chains: the
    /// promise over a pipeline's whole life, for chains read from a mirror that
    /// keeps what the input stream's limits removed. (There a dead letter
    /// followed by an outcome that does not name it is expected: the outcome of
    /// a replay made after the letter's marker aged out.)
    pub fn keys_with_two_finals(&self) -> Vec<String> {
        self.chains
            .iter()
            .filter(|(_, chain)| finals(chain) > 1)
            .map(|(key, chain)| chain_line(key, chain))
            .collect()
    }

    /// The promise over each key's chain: at most one processed-or-rejected
    /// outcome; only the replay of the current dead letter supersedes it.
    fn chain_breaches(&self) -> Vec<Found> {
        let mut two = Vec::new();
        let mut bad_supersede = Vec::new();
        for (key, chain) in &self.chains {
            for b in promise::check_chain(&links(chain)) {
                match b {
                    Breach::TwoFinals { .. } => two.push(chain_line(key, chain)),
                    // What the first outcome was written over aged out of the
                    // stream (below its first sequence): archived, not a breach.
                    Breach::FirstSupersedes { first }
                        if first.supersedes.is_some_and(|s| s < self.first_seq) => {}
                    Breach::FirstSupersedes { .. } | Breach::BadSupersede { .. } => {
                        bad_supersede.push(format!("{key}: {}", b.describe()))
                    }
                }
            }
        }
        vec![
            Found::new("inputs with two outcomes (processed and/or rejected)", two),
            Found::new(
                "outcomes written over another outcome without replaying its dead letter",
                bad_supersede,
            ),
        ]
    }

    fn lost(&self) -> Found {
        Found::new(
            "lost: stored inputs without an outcome",
            self.stored_inputs
                .iter()
                .filter(|i| !self.has_outcome(i))
                .map(|i| format!("seq {} id {:?}", i.seq, i.order_id))
                .collect(),
        )
    }

    fn orphan_outcomes(&self) -> Found {
        Found::new(
            "outcomes with no stored input",
            self.orphan_chains(false)
                .into_iter()
                .map(|k| k.to_string())
                .collect(),
        )
    }

    /// Keys whose outcomes have no stored input: those whose inputs were all
    /// removed from the stream (`archived`, below its first sequence), or the rest.
    fn orphan_chains(&self, archived: bool) -> Vec<&str> {
        let input_keys: HashSet<&String> =
            self.stored_inputs.iter().flat_map(|i| &i.keys).collect();
        self.chains
            .iter()
            .filter(|(k, _)| !input_keys.contains(k))
            .filter(|(_, chain)| {
                let gone = chain
                    .iter()
                    .all(|o| o.input_seq.is_some_and(|s| s < self.first_seq));
                gone == archived
            })
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Letters whose marker was removed from the input stream (below its first
    /// sequence): the order's outcome aged out with its input; the letter is an
    /// archive now (the DLQ keeps letters longer than the input stream).
    fn archived_letters(&self) -> usize {
        let all_markers = self.all_markers();
        self.letters
            .iter()
            .filter(|(_, m)| m.is_some_and(|m| !all_markers.contains(&m) && m < self.first_seq))
            .count()
    }

    fn all_markers(&self) -> HashSet<u64> {
        self.chains
            .values()
            .flatten()
            .filter(|o| o.kind == OutcomeKind::DeadLettered)
            .map(|o| o.seq)
            .collect()
    }

    /// Dead letters in the DLQ: each copies a marker that is its key's current
    /// outcome; a superseded one should have been removed by its replay.
    fn letter_problems(&self) -> Vec<Found> {
        let superseded = self.superseded();
        let current: HashSet<u64> = self
            .chains
            .values()
            .filter_map(|c| c.last())
            .filter(|o| o.kind == OutcomeKind::DeadLettered && !superseded.contains(&o.seq))
            .map(|o| o.seq)
            .collect();
        let all_markers = self.all_markers();
        let letters = |keep: &dyn Fn(u64) -> bool| -> Vec<String> {
            self.letters
                .iter()
                .filter(|(_, m)| m.is_some_and(keep))
                .map(|(s, m)| format!("DLQ seq {s} (marker {m:?})"))
                .collect()
        };
        vec![
            Found::new(
                "dead letters still in the DLQ although a replay superseded them (remove with orderctl dlq list/replay)",
                letters(&|m| all_markers.contains(&m) && !current.contains(&m)),
            ),
            Found::new(
                "dead letters with no input (their marker is gone, but not aged out)",
                letters(&|m| !all_markers.contains(&m) && m >= self.first_seq),
            ),
        ]
    }

    /// Asserts exactly-once outcomes: each valid id processed once, each invalid
    /// id rejected once, nothing else, and no [`Audit::violations`].
    pub fn assert_exactly_once(&self, valid: &[String], invalid: &[String]) -> anyhow::Result<()> {
        let v = self.violations();
        anyhow::ensure!(v.is_empty(), "{}", v.join("; "));
        let valid_set: HashSet<&String> = valid.iter().collect();
        let invalid_set: HashSet<&String> = invalid.iter().collect();
        let missing: Vec<_> = valid
            .iter()
            .filter(|id| !self.processed.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "lost: valid orders without OrderProcessed, e.g. {missing:?}"
        );
        let twice: Vec<_> = self
            .processed
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "processed twice: {twice:?}");
        let extra: Vec<_> = self
            .processed
            .keys()
            .filter(|id| !valid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderProcessed for {extra:?}");
        let missing: Vec<_> = invalid
            .iter()
            .filter(|id| !self.rejected.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "invalid orders without OrderRejected: {missing:?}"
        );
        let twice: Vec<_> = self
            .rejected
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "rejected twice: {twice:?}");
        let extra: Vec<_> = self
            .rejected
            .keys()
            .filter(|id| !invalid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderRejected for {extra:?}");
        Ok(())
    }

    /// Publish -> outcome latency in milliseconds, from the stream's own
    /// timestamps, for each input stored at or after `from_seq` that is the first
    /// input of its key: the time from storing it to storing the key's first outcome.
    pub fn latencies_ms(&self, from_seq: u64) -> Vec<f64> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for i in &self.stored_inputs {
            let Some(key) = i.keys.iter().find(|k| self.chains.contains_key(*k)) else {
                continue;
            };
            if !seen.insert(key.clone()) || i.seq < from_seq {
                continue;
            }
            if let Some(first) = self.chains[key].first()
                && let Ok(d) = first.stored_at.duration_since(i.stored_at)
            {
                out.push(d.as_secs_f64() * 1000.0);
            }
        }
        out
    }

    /// Current dead letters (outcomes not superseded by a replay).
    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.values().map(Vec::len).sum()
    }

    /// Current dead letters of valid orders whose attempts ran out.
    pub fn attempts_exhausted(&self) -> usize {
        self.dead_letters
            .values()
            .flatten()
            .filter(|d| d.error_class == orderpipeline_proto::ErrorClass::AttemptsExhausted as i32)
            .count()
    }

    /// The figures a person wants after a run.
    pub fn summary(&self) -> Summary {
        let lost = self
            .stored_inputs
            .iter()
            .filter(|i| !self.has_outcome(i))
            .count() as u64;
        let outcomes = self.chains.len() as u64;
        Summary {
            published: self.stored_inputs.len() as u64,
            processed: self.processed.len() as u64,
            rejected: self.rejected.len() as u64,
            dead_lettered: self.dead_letter_count() as u64,
            attempts_exhausted: self.attempts_exhausted() as u64,
            duplicates_suppressed: (self.stored_inputs.len() as u64)
                .saturating_sub(outcomes + lost),
            lost,
            processed_twice: self.processed.values().filter(|n| **n > 1).count() as u64,
            two_outcomes: self.chains.values().filter(|c| finals(c) > 1).count() as u64
                + self.legacy_and_v2.len() as u64,
            pending: self.consumer_pending + self.consumer_ack_pending,
            archived_outcomes: self.orphan_chains(true).len() as u64,
            archived_letters: self.archived_letters() as u64,
        }
    }
}

/// The `q` quantile (0..1) of `values` (nearest rank); `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// Per-run figures: `lost`, `processed_twice` and `two_outcomes` must be 0.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Input messages stored in the stream (acknowledged publishes, after dedup).
    pub published: u64,
    pub processed: u64,
    pub rejected: u64,
    /// Current dead letters (not superseded by a replay).
    pub dead_lettered: u64,
    /// Of those, valid orders whose attempts ran out.
    pub attempts_exhausted: u64,
    /// Inputs whose key already had an outcome (the same order stored again).
    pub duplicates_suppressed: u64,
    /// Input messages with no outcome at all.
    pub lost: u64,
    pub processed_twice: u64,
    /// Keys with more than one processed-or-rejected outcome.
    pub two_outcomes: u64,
    /// Messages the consumer still holds (pending + awaiting ack).
    pub pending: u64,
    /// Outcomes whose inputs were removed from the stream (aged out), and
    /// letters whose markers were: archives, not violations.
    pub archived_outcomes: u64,
    pub archived_letters: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutcomeKind::{DeadLettered as D, Processed as P, Rejected as R};
    use std::time::{Duration, UNIX_EPOCH};

    fn input(seq: u64, id: &str) -> StoredInput {
        StoredInput {
            seq,
            order_id: id.into(),
            keys: vec![id.into(), format!("=1-{seq}")],
            replay_of: None,
            stored_at: UNIX_EPOCH + Duration::from_millis(seq),
        }
    }

    fn outcome(seq: u64, kind: OutcomeKind, key: &str, replay_of: Option<u64>) -> StoredOutcome {
        StoredOutcome {
            seq,
            kind,
            key: key.into(),
            input_seq: Some(1),
            replay_of,
            keeps: (kind == OutcomeKind::Kept).then_some(OutcomeKind::Processed),
            order_id: key.into(),
            stored_at: UNIX_EPOCH + Duration::from_millis(seq),
        }
    }

    /// A healthy pipeline: a processed order, a rejected one, a dead letter
    /// replayed and processed (its letter removed), and one dead letter in the DLQ.
    fn healthy() -> Audit {
        let mut a = Audit {
            stored_inputs: vec![input(1, "a"), input(2, "b"), input(3, "c"), input(4, "d")],
            ..Default::default()
        };
        a.chains.insert("a".into(), vec![outcome(5, P, "a", None)]);
        a.chains.insert("b".into(), vec![outcome(6, R, "b", None)]);
        a.chains.insert(
            "c".into(),
            vec![outcome(7, D, "c", None), outcome(10, P, "c", Some(7))],
        );
        a.chains.insert("d".into(), vec![outcome(8, D, "d", None)]);
        a.stored_inputs.push(StoredInput {
            replay_of: Some(7),
            ..input(9, "c")
        });
        a.letters.push((2, Some(8)));
        a
    }

    #[test]
    fn a_healthy_pipeline_has_no_violation() {
        let a = healthy();
        assert_eq!(a.violations(), Vec::<String>::new());
        let s = a.summary();
        assert_eq!((s.published, s.lost, s.two_outcomes), (5, 0, 0));
    }

    /// Each violation, made to fire on a healthy pipeline.
    #[test]
    fn each_violation_fires() {
        type Break = fn(&mut Audit);
        let cases: Vec<(&str, Break)> = vec![
            (
                "inputs with two outcomes (processed and/or rejected): 1",
                |a| {
                    a.chains
                        .get_mut("a")
                        .unwrap()
                        .push(outcome(11, R, "a", Some(5)))
                },
            ),
            (
                "outcomes written over another outcome without replaying its dead letter: 1",
                |a| {
                    // An ordinary write after a dead letter (the replay header missing).
                    a.chains.get_mut("c").unwrap()[1].replay_of = None
                },
            ),
            (
                "outcomes written over another outcome without replaying its dead letter: 1",
                |a| {
                    a.chains
                        .insert("e".into(), vec![outcome(12, P, "e", Some(3))]);
                    a.stored_inputs.push(input(11, "e"));
                },
            ),
            (
                "inputs with a final record before v2 and a v2 outcome (two outcomes): 1",
                |a| a.legacy_and_v2.push(1),
            ),
            ("lost: stored inputs without an outcome: 1", |a| {
                a.stored_inputs.push(input(20, "never"))
            }),
            ("outcomes with no stored input: 1", |a| {
                a.chains
                    .insert("ghost".into(), vec![outcome(21, P, "ghost", None)]);
            }),
            (
                "dead letters still in the DLQ although a replay superseded them",
                |a| a.letters.push((3, Some(7))),
            ),
            (
                "dead letters with no input (their marker is gone, but not aged out): 1",
                |a| a.letters.push((4, Some(99))),
            ),
            (
                "stranded: the consumer still holds pending 2 ack-pending 1",
                |a| {
                    a.consumer_pending = 2;
                    a.consumer_ack_pending = 1;
                },
            ),
        ];
        for (want, break_it) in cases {
            let mut a = healthy();
            break_it(&mut a);
            let v = a.violations();
            assert!(v.iter().any(|l| l.starts_with(want)), "{want}: {v:?}");
        }
    }

    /// A week later: the oldest inputs, and a letter's marker, aged out of the
    /// input stream (below its first sequence); their outcomes and the letter
    /// are archives, not violations. A gap above the first sequence still is one.
    #[test]
    fn aged_out_inputs_and_markers_are_archived_not_violations() {
        let mut a = healthy();
        a.first_seq = 9;
        // The inputs of a, b, c (seqs 1-3) and d's input (4) and marker (8) aged out.
        a.stored_inputs.retain(|i| i.seq >= 9);
        a.chains.remove("d");
        // c's replay input (9) stays; a's and b's outcomes stay with no input.
        let v = a.violations();
        assert_eq!(v, Vec::<String>::new());
        let s = a.summary();
        assert_eq!((s.archived_outcomes, s.archived_letters, s.lost), (2, 1, 0));
        // Not aged: an outcome whose input is above the first sequence and gone.
        a.chains.insert(
            "x".into(),
            vec![outcome(12, OutcomeKind::Processed, "x", None)],
        );
        a.chains.get_mut("x").unwrap()[0].input_seq = Some(11);
        a.letters.push((5, Some(13)));
        let v = a.violations();
        assert!(
            v.iter()
                .any(|l| l.starts_with("outcomes with no stored input: 1")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|l| l.starts_with("dead letters with no input")),
            "{v:?}"
        );
    }

    /// An order stored again after its outcome keeps it (`kept`): one outcome,
    /// still one once the first copy and its outcome aged out; a kept copy
    /// written over what is still in the stream but is not its predecessor is a
    /// breach, and a final outcome after a kept one is a second outcome.
    #[test]
    fn kept_copies_are_no_second_outcome_and_survive_ageing() {
        let mut a = healthy();
        a.stored_inputs.push(input(20, "a"));
        let mut kept = outcome(21, OutcomeKind::Kept, "a", Some(5));
        kept.input_seq = Some(20);
        let a_chain = a.chains.get_mut("a").unwrap();
        let first = a_chain[0].seq;
        kept.replay_of = Some(first);
        a_chain.push(kept.clone());
        assert_eq!(a.violations(), Vec::<String>::new());
        assert_eq!(finals(&a.chains["a"]), 1);
        // The first copy and its outcome aged out: the kept copy stands alone.
        a.first_seq = first + 1;
        a.stored_inputs.retain(|i| i.seq > first);
        a.chains.get_mut("a").unwrap().retain(|o| o.seq > first);
        assert_eq!(a.violations(), Vec::<String>::new());
        // Written over something still stored that is not its predecessor.
        let mut b = healthy();
        let mut stray = kept.clone();
        stray.replay_of = Some(99);
        b.stored_inputs.push(input(20, "a"));
        b.chains.get_mut("a").unwrap().push(stray);
        assert!(
            b.violations()
                .iter()
                .any(|l| l.starts_with("outcomes written over another outcome")),
            "{:?}",
            b.violations()
        );
        // A processed outcome after a kept one: two outcomes.
        let mut c = healthy();
        c.stored_inputs.push(input(20, "a"));
        c.chains.get_mut("a").unwrap().push(kept.clone());
        let mut again = outcome(30, OutcomeKind::Processed, "a", Some(21));
        again.input_seq = Some(20);
        c.chains.get_mut("a").unwrap().push(again);
        assert!(
            c.violations()
                .iter()
                .any(|l| l.starts_with("inputs with two outcomes")),
            "{:?}",
            c.violations()
        );
    }

    #[test]
    fn a_final_record_before_v2_counts_as_the_outcome() {
        let mut a = healthy();
        a.stored_inputs.push(input(20, "old"));
        assert_eq!(a.summary().lost, 1);
        a.legacy_final.insert(20);
        assert_eq!(a.summary().lost, 0);
        assert_eq!(a.violations(), Vec::<String>::new());
    }

    #[test]
    fn the_tally_counts_current_outcomes_and_second_finals() {
        let mut a = healthy();
        a.chains
            .get_mut("a")
            .unwrap()
            .push(outcome(11, P, "a", Some(5)));
        let letter = |seq: u64| DeadLetter {
            original_stream_sequence: seq,
            ..Default::default()
        };
        a.tally(HashMap::from([(7, letter(3)), (8, letter(4))]));
        assert_eq!(a.processed.get("a"), Some(&2));
        assert_eq!(a.processed.get("c"), Some(&1));
        assert_eq!(a.rejected.get("b"), Some(&1));
        // 7 was superseded by the replay; 8 is current.
        assert_eq!(a.dead_letter_count(), 1);
        assert!(a.dead_letters.contains_key(&4));
        assert!(a.assert_exactly_once(&["c".into()], &["b".into()]).is_err());
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
