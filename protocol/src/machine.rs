//! The outcome protocol (v2) as a pure state machine: what one delivery of one
//! input does next, given what it has learned. The handler (`handler.rs`) carries
//! the steps out against NATS; the model checker (`model.rs`) carries them out
//! against a model of the stream with crashes, lost acks, concurrent deliveries
//! and failing or ambiguous writes. Both call [`Machine::on`], so the model checks
//! this code, not a copy of it.
//!
//! The protocol in one paragraph: every input has a key (its order id, encoded, or
//! its stream position when it has no usable id). Its outcome is one message on
//! `<prefix>.<kind>.<key>` in the pipeline's own stream, written with
//! `Nats-Expected-Last-Subject-Sequence` over `<prefix>.*.<key>`: the stream lets
//! exactly one outcome per key in, for as long as it keeps it, whatever the
//! interleaving. Any other delivery's write fails with "wrong last sequence" and
//! that delivery just acks. A replay of a dead letter expects the letter's own
//! sequence, so it (and only it) supersedes the letter. The ack is the last step
//! and needs no confirmation: a redelivery finds the outcome and acks again.

pub use crate::keys::OutcomeKind;

use crate::decide::CallClass;

/// What the input is, decided before any I/O (decode, size, validation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A valid order: (call the downstream, then) record it processed.
    Process,
    /// An invalid order: record it rejected.
    Reject,
    /// Cannot be handled at all (undecodable, oversized): dead-letter it.
    DeadLetter,
}

/// Facts about this delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// JetStream's delivery count (1 = first).
    pub delivered: u64,
    pub max_deliveries: u32,
    /// The sequence of the dead-letter marker this input replays, if any.
    pub replay_of: Option<u64>,
    /// A replay whose letter's marker is gone (aged out, removed): an ordinary
    /// input (nothing to supersede) that removes its letter once its key has an
    /// outcome, so the letter does not stay in the DLQ.
    pub orphan_letter: bool,
    /// Whether a downstream service is configured.
    pub downstream: bool,
    /// This input's sequence in the stream: an outcome older than it (the same
    /// order stored again after it had its outcome) is kept (see [`Step::Keep`]).
    pub input_seq: u64,
}

impl Delivery {
    fn last(&self) -> bool {
        self.delivered >= u64::from(self.max_deliveries)
    }
    /// A delivery after the one after the last: the input keeps killing the
    /// workers that take it, so it is dead-lettered without another try. (The
    /// delivery after the last still tries: the last one may have died after the
    /// downstream charged, and the Idempotency-Key makes the repeat safe.)
    fn beyond_last(&self) -> bool {
        self.delivered > u64::from(self.max_deliveries) + 1
    }
    /// The key's last outcome sequence this delivery may write over: 0 (none),
    /// or the letter a replay supersedes.
    fn base(&self) -> u64 {
        self.replay_of.unwrap_or(0)
    }
    /// Whether the delivery ends by removing a dead letter.
    fn removes_letter(&self) -> bool {
        self.replay_of.is_some() || self.orphan_letter
    }
}

/// Why an outcome is a dead letter (maps to `ErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The verdict itself (undecodable or oversized input).
    Unhandleable,
    /// The downstream refused for good.
    Permanent,
    /// Transient failures lasted until the last allowed delivery.
    AttemptsExhausted,
}

/// The next thing the delivery does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Read the key's last outcome (kind and sequence), if any.
    ReadOutcome,
    /// Call the downstream service (with its in-process retries).
    CallDownstream,
    /// Publish the outcome, expecting the key's last outcome sequence to be `expect`.
    Write {
        kind: OutcomeKind,
        expect: u64,
        dead: Option<DeadReason>,
    },
    /// The key's outcome, at `over`, is older than this input (the same order
    /// stored again later): write a `kept` copy of it over it, so the key's last
    /// message is newer than every input with the key and no age limit removes
    /// the outcome while an input of the order remains. A dead letter is not
    /// kept (its copy would be a second letter): the executor answers `Written`
    /// without writing (see [`keeps`]).
    Keep { over: u64 },
    /// Remove the superseded dead letter (a replay whose outcome exists).
    RemoveLetter,
    /// The input has its outcome: ack (no confirmation needed).
    Ack,
    /// Give the input back for a later delivery.
    Nak,
}

/// What the last step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    Start,
    /// The key's last outcome: `None`, or its sequence.
    Read(Option<u64>),
    ReadFailed,
    Downstream(CallClass),
    Written,
    /// Wrong last sequence: another outcome is (or is being) written for the key.
    Conflict,
    /// The write failed or timed out: it may or may not be stored.
    WriteFailed,
    /// The letter is removed (or was already gone).
    Removed,
    RemoveFailed,
}

/// How many times one delivery re-sends a failed write before giving the input back.
pub const WRITE_TRIES: u8 = 3;

/// One delivery's protocol state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Machine {
    pub verdict: Verdict,
    pub delivery: Delivery,
    /// The outcome this delivery will write, once known.
    pending: Option<(OutcomeKind, u64, Option<DeadReason>)>,
    write_tries: u8,
    /// Reads after a conflict, bounded so a flapping key cannot spin.
    conflicts: u8,
    /// Writing a `kept` copy (not this input's own outcome).
    keeping: bool,
}

/// Whether an outcome of `kind` at the key's head is kept by a later input
/// (processed, rejected and kept ones are; a dead letter is not: it is
/// superseded only by its replay, and a copy would reach the DLQ as a second
/// letter).
pub fn keeps(kind: OutcomeKind) -> bool {
    kind != OutcomeKind::DeadLettered
}

impl Machine {
    pub fn new(verdict: Verdict, delivery: Delivery) -> Self {
        Self {
            verdict,
            delivery,
            pending: None,
            write_tries: 0,
            conflicts: 0,
            keeping: false,
        }
    }

    fn write(&mut self, kind: OutcomeKind, expect: u64, dead: Option<DeadReason>) -> Step {
        self.pending = Some((kind, expect, dead));
        Step::Write { kind, expect, dead }
    }

    /// The outcome this delivery reaches when nothing stands in its way, writing
    /// over `expect`.
    fn proceed(&mut self, expect: u64) -> Step {
        let d = self.delivery;
        if d.beyond_last() {
            // The last allowed delivery died with its worker.
            return self.write(
                OutcomeKind::DeadLettered,
                expect,
                Some(DeadReason::AttemptsExhausted),
            );
        }
        match self.verdict {
            Verdict::DeadLetter => self.write(
                OutcomeKind::DeadLettered,
                expect,
                Some(DeadReason::Unhandleable),
            ),
            Verdict::Reject => self.write(OutcomeKind::Rejected, expect, None),
            Verdict::Process if d.downstream => {
                self.pending = Some((OutcomeKind::Processed, expect, None));
                Step::CallDownstream
            }
            Verdict::Process => self.write(OutcomeKind::Processed, expect, None),
        }
    }

    /// A transient failure: give the input back, or on the last delivery
    /// dead-letter it (still a conditional write: it cannot be a second outcome).
    fn transient(&mut self, expect: u64) -> Step {
        if self.delivery.last() {
            self.write(
                OutcomeKind::DeadLettered,
                expect,
                Some(DeadReason::AttemptsExhausted),
            )
        } else {
            Step::Nak
        }
    }

    /// After reading the key's last outcome (`last`, 0 for none).
    fn on_read(&mut self, last: u64) -> Step {
        let d = self.delivery;
        if let Some((kind, expect, dead)) = self.pending {
            // A replay whose letter vanished while it worked (aged out,
            // removed, purged) and whose key has no outcome left has
            // nothing to supersede: it writes over nothing, so the order
            // still ends with exactly one outcome.
            let expect = if last == 0 && d.replay_of == Some(expect) {
                0
            } else {
                expect
            };
            // Reading after a conflict: the expectation still holds when the
            // conflicting write was not stored; try again (bounded).
            if last == expect {
                return if self.conflicts < WRITE_TRIES {
                    self.write(kind, expect, dead)
                } else {
                    Step::Nak
                };
            }
        } else if last == d.base() || last == 0 {
            // Nothing this delivery may not write over (a replay whose
            // letter has aged out of the stream has nothing to supersede).
            return self.proceed(last);
        }
        // The key has an outcome this delivery may not replace. For a replay
        // that means its letter is superseded: remove it. An outcome older than
        // this input is kept alive by it (bounded, like writes).
        if d.removes_letter() {
            Step::RemoveLetter
        } else if last < d.input_seq && self.conflicts < WRITE_TRIES {
            self.keeping = true;
            Step::Keep { over: last }
        } else {
            Step::Ack
        }
    }

    /// The next step after `event`.
    pub fn on(&mut self, event: Event) -> Step {
        let d = self.delivery;
        match event {
            Event::Start => {
                // A replay must learn whether its letter is still the outcome, and a
                // downstream call must not be made for an input that has one.
                let needs_read = d.replay_of.is_some()
                    || (d.downstream && self.verdict == Verdict::Process && !d.beyond_last());
                if needs_read {
                    Step::ReadOutcome
                } else {
                    self.proceed(d.base())
                }
            }
            Event::Read(last) => self.on_read(last.unwrap_or(0)),
            Event::ReadFailed => match self.pending {
                Some((_, expect, _)) => self.transient(expect),
                None => self.transient(d.base()),
            },
            Event::Downstream(CallClass::Ok) => {
                self.write(OutcomeKind::Processed, self.expect(), None)
            }
            Event::Downstream(CallClass::Permanent) => self.write(
                OutcomeKind::DeadLettered,
                self.expect(),
                Some(DeadReason::Permanent),
            ),
            Event::Downstream(CallClass::Transient) => self.transient(self.expect()),
            Event::Written if self.keeping => Step::Ack,
            Event::Written => {
                if d.removes_letter() {
                    Step::RemoveLetter
                } else {
                    Step::Ack
                }
            }
            Event::Conflict => {
                self.conflicts += 1;
                Step::ReadOutcome
            }
            Event::WriteFailed if self.keeping => {
                // Unknown whether the copy is stored: the redelivery reads again.
                self.write_tries += 1;
                Step::Nak
            }
            Event::WriteFailed => {
                self.write_tries += 1;
                match self.pending {
                    Some((kind, expect, dead)) if self.write_tries < WRITE_TRIES => {
                        self.write(kind, expect, dead)
                    }
                    // Still unknown whether it is stored: the redelivery finds out.
                    _ => Step::Nak,
                }
            }
            Event::Removed => Step::Ack,
            // The input has its outcome; the redelivery finds it superseded and
            // removes the letter again.
            Event::RemoveFailed => Step::Nak,
        }
    }

    fn expect(&self) -> u64 {
        self.pending.map_or(self.delivery.base(), |(_, e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(delivered: u64) -> Delivery {
        Delivery {
            delivered,
            max_deliveries: 5,
            replay_of: None,
            orphan_letter: false,
            downstream: false,
            input_seq: 1,
        }
    }

    #[test]
    fn a_valid_order_without_downstream_is_one_write_then_ack() {
        let mut m = Machine::new(Verdict::Process, d(1));
        assert_eq!(
            m.on(Event::Start),
            Step::Write {
                kind: OutcomeKind::Processed,
                expect: 0,
                dead: None
            }
        );
        assert_eq!(m.on(Event::Written), Step::Ack);
    }

    #[test]
    fn a_conflict_with_an_existing_outcome_acks() {
        let mut m = Machine::new(Verdict::Process, d(2));
        m.on(Event::Start);
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(9))), Step::Ack);
    }

    #[test]
    fn a_later_copy_keeps_an_older_outcome_alive() {
        // Stored at 20, the key's outcome at 12: kept, then acked.
        let later = Delivery {
            input_seq: 20,
            downstream: true,
            ..d(1)
        };
        let mut m = Machine::new(Verdict::Process, later);
        assert_eq!(m.on(Event::Start), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(12))), Step::Keep { over: 12 });
        assert_eq!(m.on(Event::Written), Step::Ack);
        // Someone kept it first (or wrote a newer outcome): read again, done.
        let mut m = Machine::new(Verdict::Process, later);
        m.on(Event::Start);
        m.on(Event::Read(Some(12)));
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(25))), Step::Ack);
        // The outcome vanished meanwhile: this copy is the order's input now.
        let mut m = Machine::new(Verdict::Process, later);
        m.on(Event::Start);
        m.on(Event::Read(Some(12)));
        m.on(Event::Conflict);
        assert_eq!(m.on(Event::Read(None)), Step::CallDownstream);
        // An ambiguous write of the copy: the redelivery finds out.
        let mut m = Machine::new(Verdict::Process, later);
        m.on(Event::Start);
        m.on(Event::Read(Some(12)));
        assert_eq!(m.on(Event::WriteFailed), Step::Nak);
        // Without a downstream the write conflicts first, then keeps.
        let mut m = Machine::new(
            Verdict::Reject,
            Delivery {
                input_seq: 20,
                ..d(1)
            },
        );
        assert!(matches!(m.on(Event::Start), Step::Write { expect: 0, .. }));
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(12))), Step::Keep { over: 12 });
        // An outcome newer than the input is not kept.
        let mut m = Machine::new(
            Verdict::Reject,
            Delivery {
                input_seq: 5,
                ..d(1)
            },
        );
        m.on(Event::Start);
        m.on(Event::Conflict);
        assert_eq!(m.on(Event::Read(Some(12))), Step::Ack);
        assert!(!keeps(OutcomeKind::DeadLettered));
        assert!(keeps(OutcomeKind::Processed) && keeps(OutcomeKind::Kept));
    }

    #[test]
    fn a_conflict_with_nothing_stored_writes_again() {
        let mut m = Machine::new(Verdict::Reject, d(1));
        m.on(Event::Start);
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert!(matches!(
            m.on(Event::Read(None)),
            Step::Write { expect: 0, .. }
        ));
    }

    #[test]
    fn downstream_is_called_only_when_no_outcome_exists() {
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(1)
            },
        );
        assert_eq!(m.on(Event::Start), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(3))), Step::Ack);
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(1)
            },
        );
        m.on(Event::Start);
        assert_eq!(m.on(Event::Read(None)), Step::CallDownstream);
        assert!(matches!(
            m.on(Event::Downstream(CallClass::Ok)),
            Step::Write {
                kind: OutcomeKind::Processed,
                expect: 0,
                ..
            }
        ));
    }

    #[test]
    fn transient_failures_nak_until_the_last_delivery_then_dead_letter() {
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(4)
            },
        );
        m.on(Event::Start);
        m.on(Event::Read(None));
        assert_eq!(m.on(Event::Downstream(CallClass::Transient)), Step::Nak);
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(5)
            },
        );
        m.on(Event::Start);
        m.on(Event::Read(None));
        assert_eq!(
            m.on(Event::Downstream(CallClass::Transient)),
            Step::Write {
                kind: OutcomeKind::DeadLettered,
                expect: 0,
                dead: Some(DeadReason::AttemptsExhausted)
            }
        );
    }

    #[test]
    fn the_delivery_after_the_last_tries_once_more_then_dead_letters() {
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(6)
            },
        );
        assert_eq!(m.on(Event::Start), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(None)), Step::CallDownstream);
        assert!(matches!(
            m.on(Event::Downstream(CallClass::Transient)),
            Step::Write {
                kind: OutcomeKind::DeadLettered,
                dead: Some(DeadReason::AttemptsExhausted),
                ..
            }
        ));
        let mut m = Machine::new(
            Verdict::Process,
            Delivery {
                downstream: true,
                ..d(7)
            },
        );
        assert!(matches!(
            m.on(Event::Start),
            Step::Write {
                kind: OutcomeKind::DeadLettered,
                dead: Some(DeadReason::AttemptsExhausted),
                ..
            }
        ));
    }

    #[test]
    fn failed_writes_are_retried_with_the_same_expectation_then_naked() {
        let mut m = Machine::new(Verdict::Process, d(1));
        let first = m.on(Event::Start);
        assert_eq!(m.on(Event::WriteFailed), first);
        assert_eq!(m.on(Event::WriteFailed), first);
        assert_eq!(m.on(Event::WriteFailed), Step::Nak);
    }

    #[test]
    fn a_replay_supersedes_only_its_own_letter_and_removes_it() {
        let r = Delivery {
            replay_of: Some(7),
            ..d(1)
        };
        let mut m = Machine::new(Verdict::Process, r);
        assert_eq!(m.on(Event::Start), Step::ReadOutcome);
        assert_eq!(
            m.on(Event::Read(Some(7))),
            Step::Write {
                kind: OutcomeKind::Processed,
                expect: 7,
                dead: None
            }
        );
        assert_eq!(m.on(Event::Written), Step::RemoveLetter);
        assert_eq!(m.on(Event::Removed), Step::Ack);
        // Someone else superseded it already.
        let mut m = Machine::new(Verdict::Process, r);
        m.on(Event::Start);
        assert_eq!(m.on(Event::Read(Some(12))), Step::RemoveLetter);
    }

    #[test]
    fn a_replay_whose_letter_vanishes_mid_flight_writes_over_nothing() {
        let r = Delivery {
            replay_of: Some(7),
            downstream: true,
            ..d(1)
        };
        let mut m = Machine::new(Verdict::Process, r);
        assert_eq!(m.on(Event::Start), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(7))), Step::CallDownstream);
        let write = |expect| Step::Write {
            kind: OutcomeKind::Processed,
            expect,
            dead: None,
        };
        assert_eq!(m.on(Event::Downstream(CallClass::Ok)), write(7));
        // The letter (7) was removed meanwhile: the write over it conflicts and the
        // key has no outcome at all.
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(None)), write(0));
        assert_eq!(m.on(Event::Written), Step::RemoveLetter);
        // Had another delivery written the key's outcome meanwhile, it stands.
        let mut m = Machine::new(Verdict::Process, r);
        m.on(Event::Start);
        m.on(Event::Read(Some(7)));
        m.on(Event::Downstream(CallClass::Ok));
        m.on(Event::Conflict);
        assert_eq!(m.on(Event::Read(Some(30))), Step::RemoveLetter);
    }

    #[test]
    fn a_replay_whose_letter_is_orphaned_writes_over_nothing_then_removes_it() {
        let r = Delivery {
            orphan_letter: true,
            ..d(1)
        };
        let mut m = Machine::new(Verdict::Process, r);
        assert_eq!(
            m.on(Event::Start),
            Step::Write {
                kind: OutcomeKind::Processed,
                expect: 0,
                dead: None
            }
        );
        assert_eq!(m.on(Event::Written), Step::RemoveLetter);
        assert_eq!(m.on(Event::Removed), Step::Ack);
        // The key has its outcome already: the letter goes all the same.
        let mut m = Machine::new(Verdict::Process, r);
        m.on(Event::Start);
        assert_eq!(m.on(Event::Conflict), Step::ReadOutcome);
        assert_eq!(m.on(Event::Read(Some(4))), Step::RemoveLetter);
    }
}
