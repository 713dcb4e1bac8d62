//! Model checking of the outcome protocol with `stateright`.
//!
//! [`V2`] runs the worker's own state machine ([`orderpipeline_protocol::machine::Machine`]) against
//! a model of one JetStream stream and its consumer: deliveries (a redelivery may
//! overlap a delivery still in flight, as after an ack-wait expiry), a worker
//! crash at any step, lost acks, reads and writes that fail, writes that are
//! stored but whose answer is lost (ambiguous), a downstream that succeeds, fails
//! or refuses, the dead-letter copy and `orderctl dlq replay` of it, and inputs
//! that carry the same order id (a producer that re-published after the duplicate
//! window). Every fault has a budget, so every path ends.
//!
//! [`V1`] is the protocol before it (KV `pending` record, result event deduplicated
//! by `Nats-Msg-Id` inside the stream's duplicate window, KV compare-and-set,
//! double ack), with the duplicate window as a real bound: the checker finds the
//! order that gets two `OrderProcessed` events.
//!
//! Time and identity (v2): a later copy of an order stored after its outcome
//! (a re-send within the stream's memory of the order), the stream's limits
//! removing its oldest message (an input only once acknowledged: the operator
//! holds `maxAge` above unprocessed inputs; a dead letter's marker stays), and
//! the consumer recreated, delivering every stored input again. Not modelled
//! yet: stream recreation with renumbered sequences, and an outcome ageing out
//! while a later copy of its order waits unprocessed.
//!
//! Every property is shown able to fail: each `mutation_*` test breaks the
//! protocol in one way ([`Mutation`]) and asserts the checker finds the
//! property's counterexample (printed; listed in the durability docs).
//!
//! Properties (both models):
//! - always: at most one processed-or-rejected outcome per order, over the
//!   stream's whole life (also once limits removed the first), and every outcome
//!   other than the order's latest is a dead letter superseded by a replay or a
//!   final outcome kept by a later copy;
//! - always: no downstream call starts after the order's outcome exists, unless
//!   another delivery of the same order was in flight between this one's read
//!   of the outcome and its call (two deliveries of one order can overlap after an ack wait expires,
//!   or when the same order id was stored twice; the Idempotency-Key makes such a
//!   call a no-op at a correct downstream);
//! - always: every outcome belongs to a stored input;
//! - at the end of every path: each stored input's order has exactly one current
//!   outcome, each live dead letter is the order's current outcome, and the
//!   downstream charged only orders whose outcome is processed, except an order
//!   whose delivery died, or whose downstream call or outcome write failed, after
//!   the charge, or
//!   that was charged by a delivery overlapping another of the same order (the
//!   worker cannot know of such a charge; the order is dead-lettered and its
//!   replay completes it, the Idempotency-Key making the repeated call safe).

use std::fmt::Debug;
use std::hash::Hash;

use stateright::{Model, Property};

use orderpipeline_protocol::decide::CallClass;
use orderpipeline_protocol::machine::{self, Delivery, Event, Machine, OutcomeKind, Step, Verdict};
use orderpipeline_protocol::promise;
use orderpipeline_protocol::replay::{self, AtMarker};

/// What may go wrong in one run, and how often.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Budget {
    pub crashes: u8,
    /// Read/write failures, ambiguous writes, downstream failures (in total).
    pub failures: u8,
    pub lost_acks: u8,
    /// Deliveries that start while another delivery of the same input is in flight.
    pub overlaps: u8,
    pub replays: u8,
    /// V1 only: the duplicate window may pass this many times.
    pub windows: u8,
    /// Later copies of an order the producer stores (re-sent after the
    /// duplicate window, or under another message id).
    pub copies: u8,
    /// Messages the stream's limits remove, oldest first (`maxAge`).
    pub removals: u8,
    /// Times the consumer is deleted and created again (it delivers every
    /// stored input again: `DeliverPolicy: all`).
    pub recreations: u8,
    /// Times the input stream is deleted and created again: its messages go,
    /// sequences restart at 1, the dead-letter stream keeps its letters.
    pub stream_recreations: u8,
}

/// One input the stream stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Input {
    /// The order (inputs with the same order share it).
    pub order: u8,
    pub verdict: Verdict,
    /// A replay's claim: the marker's sequence and the identity of the stream
    /// it was in (`Orderpipeline-Replay-Of`, `-Replay-Stream`).
    pub claim: Option<(u64, u8)>,
    pub seq: u64,
    pub acked: bool,
    pub delivered: u64,
    pub in_flight: u8,
    /// Removed from the stream by its limits (only once acknowledged: the
    /// operator holds `maxAge` above unprocessed inputs).
    pub removed: bool,
}

/// An outcome message in the stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    pub order: u8,
    pub seq: u64,
    pub kind: OutcomeKind,
    /// The last outcome sequence the write expected (0 = none).
    pub over: u64,
    /// The order its event carries (its key's order, unless a write took
    /// another order's key).
    pub carries: u8,
    /// For a kept copy: the kind of the outcome it keeps.
    pub keeps: Option<OutcomeKind>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Worker {
    pub input: usize,
    pub machine: Machine,
    pub step: Step,
    /// No other delivery of the same order has been in flight since this one read
    /// the outcome: its downstream call must then never follow the outcome.
    pub alone_at_read: bool,
    /// This delivery's downstream call charged the order.
    pub charged: bool,
    /// The order whose key this delivery reads and writes (its input's, or the
    /// letter's a replay supersedes).
    pub key: u8,
}

/// A copy in the dead-letter stream of a marker in the input stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Letter {
    pub order: u8,
    pub marker: u64,
    /// The identity of the input stream the marker was in.
    pub stream: u8,
    /// Removed after its replay's outcome was stored.
    pub removed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub inputs: Vec<Input>,
    pub outcomes: Vec<Outcome>,
    pub workers: Vec<Worker>,
    pub next_seq: u64,
    /// Orders the downstream charged (2xx given).
    pub charged: Vec<u8>,
    /// A downstream call started although the order already had an outcome.
    pub late_call: bool,
    /// Orders whose delivery died, or whose downstream call or outcome write
    /// failed, after the downstream had charged them, or charged by a delivery that overlapped
    /// another one of the same order (before or after the charge): the charge may not be the outcome's, and
    /// the order may end dead-lettered (a replay completes it; the key makes the
    /// repeated call safe).
    pub suspect: Vec<u8>,
    /// Every processed-or-rejected outcome ever written, by order: the promise
    /// over the stream's whole life, also once limits removed some.
    pub finals_written: Vec<u8>,
    /// Outcomes the limits removed: sequence, order, and the kind it was (or
    /// kept). An outcome written over one of them is written over what aged
    /// out, as in the audit's archive.
    pub aged_out: Vec<(u8, u64, u8, OutcomeKind)>,
    /// The dead-letter stream.
    pub letters: Vec<Letter>,
    /// The input stream's identity (its creation: a recreated stream has another).
    pub stream: u8,
    pub budget: Budget,
}

/// The stream's oldest message.
enum Oldest {
    Input(usize),
    Outcome(usize),
}

impl State {
    /// The oldest stored message, when limits may remove it: an acknowledged
    /// input (the hold keeps unprocessed ones) or a final or kept outcome (a
    /// dead letter's marker stays: its letter's replay names it).
    fn oldest(&self) -> Option<Oldest> {
        let input = self
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.removed)
            .min_by_key(|(_, i)| i.seq);
        let outcome = self.outcomes.iter().enumerate().min_by_key(|(_, o)| o.seq);
        match (input, outcome) {
            (Some((i, input)), o) if o.is_none_or(|(_, o)| input.seq < o.seq) => {
                (input.acked && input.in_flight == 0).then_some(Oldest::Input(i))
            }
            (_, Some((o, outcome))) => machine::keeps(outcome.kind).then_some(Oldest::Outcome(o)),
            _ => None,
        }
    }

    /// The stream stores an input of `order` at its next sequence.
    fn store(&mut self, order: u8, verdict: Verdict, claim: Option<(u64, u8)>) {
        self.inputs.push(Input {
            order,
            verdict,
            claim,
            seq: self.next_seq,
            acked: false,
            delivered: 0,
            in_flight: 0,
            removed: false,
        });
        self.next_seq += 1;
    }

    fn quiet(&self) -> bool {
        self.workers.is_empty()
    }

    fn last_on(&self, order: u8) -> Option<u64> {
        self.outcomes
            .iter()
            .filter(|o| o.order == order)
            .map(|o| o.seq)
            .max()
    }

    /// Worker `w`'s delivery ends (acked, nacked or died): its input is no longer
    /// in flight.
    fn end_delivery(&mut self, w: usize) -> Worker {
        let worker = self.workers.remove(w);
        self.inputs[worker.input].in_flight -= 1;
        worker
    }

    /// A v2 worker's downstream call for `input`: `Fault::None` charges the order,
    /// `Fault::Refused` is a permanent refusal, any other fault a transient failure.
    fn call_downstream(
        &mut self,
        order: u8,
        base: u64,
        alone_at_read: bool,
        charged: &mut bool,
        fault: Fault,
    ) -> Event {
        // An outcome other than the letter a replay may supersede (`base`).
        if alone_at_read && self.last_on(order).unwrap_or(0) != base {
            self.late_call = true;
        }
        match fault {
            Fault::None => {
                *charged = true;
                if !self.charged.contains(&order) {
                    self.charged.push(order);
                }
                if !alone_at_read && !self.suspect.contains(&order) {
                    self.suspect.push(order);
                }
                Event::Downstream(CallClass::Ok)
            }
            f => {
                if self.charged.contains(&order) && !self.suspect.contains(&order) {
                    self.suspect.push(order);
                }
                if f == Fault::Refused {
                    Event::Downstream(CallClass::Permanent)
                } else {
                    Event::Downstream(CallClass::Transient)
                }
            }
        }
    }

    /// A v2 worker's outcome write for `order`, expecting `expect` as the last
    /// outcome: it fails, conflicts, or is stored (its answer lost on
    /// `Fault::StoredButLost`).
    fn write_outcome(
        &mut self,
        order: u8,
        carries: u8,
        kind: OutcomeKind,
        expect: u64,
        charged: bool,
        fault: Fault,
    ) -> Event {
        let last = self.last_on(order).unwrap_or(0);
        if fault == Fault::Fail {
            if charged && !self.suspect.contains(&order) {
                self.suspect.push(order);
            }
            Event::WriteFailed
        } else if last != expect {
            Event::Conflict
        } else {
            self.outcomes.push(Outcome {
                order,
                seq: self.next_seq,
                kind,
                over: expect,
                carries,
                keeps: None,
            });
            if matches!(kind, OutcomeKind::Processed | OutcomeKind::Rejected) {
                self.finals_written.push(order);
            }
            if kind == OutcomeKind::DeadLettered {
                // The dead-letter stream sources it (nats-server 2.15 also from
                // a recreated stream).
                self.letters.push(Letter {
                    order,
                    marker: self.next_seq,
                    stream: self.stream,
                    removed: false,
                });
            }
            self.next_seq += 1;
            if fault == Fault::StoredButLost {
                Event::WriteFailed
            } else {
                Event::Written
            }
        }
    }

    /// A v2 worker keeps the outcome at `over` with a `kept` copy (as the
    /// handler does: a dead letter is not kept, a vanished one is a conflict).
    fn keep_outcome(&mut self, order: u8, carries: u8, over: u64, fault: Fault) -> Event {
        let Some(original) = self.outcomes.iter().find(|o| o.seq == over).cloned() else {
            return Event::Conflict;
        };
        if !machine::keeps(original.kind) {
            return Event::Written;
        }
        let stored = self.outcomes.len();
        let event = self.write_outcome(order, carries, OutcomeKind::Kept, over, false, fault);
        if let Some(kept) = self.outcomes.get_mut(stored) {
            kept.keeps = original.keeps.or(Some(original.kind));
        }
        event
    }

    /// The kind of `order`'s current outcome: its latest, seen through `kept`
    /// copies to the outcome they keep.
    fn current_kind(&self, order: u8) -> Option<OutcomeKind> {
        let mut chain: Vec<&Outcome> = self.outcomes.iter().filter(|o| o.order == order).collect();
        chain.sort_by_key(|o| o.seq);
        chain.last().map(|o| o.keeps.unwrap_or(o.kind)).or_else(|| {
            // All aged out: the last one it had.
            self.aged_out
                .iter()
                .rev()
                .find(|(_, _, o, _)| *o == order)
                .map(|(_, _, _, k)| *k)
        })
    }

    /// A v2 worker removes the dead-letter copy its replayed `input` names.
    fn remove_letter(&mut self, input: usize) -> Event {
        let claim = self.inputs[input].claim;
        if let Some(l) = self
            .letters
            .iter_mut()
            .find(|l| Some((l.marker, l.stream)) == claim)
        {
            l.removed = true;
        }
        Event::Removed
    }

    /// What the input stream holds at `seq`, as the worker reads it.
    fn at(&self, seq: u64) -> (AtMarker<'static>, Option<u8>) {
        if let Some(o) = self.outcomes.iter().find(|o| o.seq == seq) {
            (
                AtMarker::Outcome(o.kind, KEYS[o.order as usize]),
                Some(o.order),
            )
        } else if self.inputs.iter().any(|i| i.seq == seq && !i.removed) {
            (AtMarker::Other, None)
        } else {
            (AtMarker::Nothing, None)
        }
    }

    /// A letter the live stream holds no replay of yet: its marker is its
    /// order's current outcome, or gone with its stream or by age.
    fn replayable(&self, l: &Letter) -> bool {
        let marker_stored =
            l.stream == self.stream && self.outcomes.iter().any(|o| o.seq == l.marker);
        !l.removed && (!marker_stored || self.last_on(l.order) == Some(l.marker))
    }
}

/// The v2 protocol: the worker's own [`Machine`] against the stream.
#[derive(Clone, Debug)]
pub struct V2 {
    /// The verdict of each input, in the order the stream stored them, with its order.
    pub inputs: Vec<(u8, Verdict)>,
    pub max_deliveries: u32,
    pub downstream: bool,
    pub budget: Budget,
    /// A deliberately broken variant of the protocol, to show a property can fail.
    pub mutation: Option<Mutation>,
    /// Inputs the producer stores into the input stream once it is recreated.
    pub after_recreation: Vec<(u8, Verdict)>,
}

/// Deliberate breakages of the worker's protocol, each of which one property
/// must catch (tests `mutation_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Outcome writes ignore the expected last sequence (no conditional write).
    UnconditionalWrite,
    /// The read before a downstream call always finds no outcome.
    BlindRead,
    /// The worker acks instead of writing its outcome.
    AckWithoutOutcome,
    /// The outcome goes under another order's key.
    WrongKey,
    /// A later copy does not keep the outcome it finds older than itself.
    NoKeep,
    /// A replay names its letter by the marker's sequence alone and takes the
    /// key from whatever letter is at that sequence (before issue 23), and
    /// orderctl replays letters of an earlier stream with their old sequence.
    SequenceOnly,
}

/// The key of each order (their ids differ).
const KEYS: [&str; 4] = ["A", "B", "C", "D"];

fn key_of(order: u8) -> &'static str {
    KEYS.get(usize::from(order)).copied().unwrap_or("other")
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Deliver(usize),
    /// Carry out worker `w`'s step; `fault` picks the failing variant.
    Run {
        w: usize,
        fault: Fault,
    },
    Crash(usize),
    /// `orderctl dlq replay` of the letter at this index of the DLQ.
    Replay(usize),
    /// V1 only: the stream's duplicate window passes (it forgets the ids).
    WindowPasses,
    /// The producer stores this order again (between deliveries).
    Republish(u8),
    /// The stream's limits remove its oldest message (between deliveries).
    AgeOut,
    /// The consumer is recreated and delivers every stored input again.
    RecreateConsumer,
    /// The input stream is deleted and created again (the DLQ kept).
    RecreateStream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    None,
    /// The request fails (nothing happens).
    Fail,
    /// The write is stored but its answer is lost (ambiguous timeout).
    StoredButLost,
    /// The downstream answers with a permanent refusal.
    Refused,
    /// The ack is lost.
    LostAck,
}

impl V2 {
    /// The delivery of input `i` as the worker sees it: a replay is judged
    /// ([`replay::judge`]) against the stream's identity and what it holds at
    /// the marker; and the key it reads and writes.
    fn delivery(&self, s: &State, i: usize) -> (Delivery, u8) {
        let input = &s.inputs[i];
        let (mut key, mut replay_of, mut orphan_letter) = (input.order, None, false);
        if let Some((marker, stream)) = input.claim {
            let (at, holder) = s.at(marker);
            if self.mutation == Some(Mutation::SequenceOnly) {
                if let (AtMarker::Outcome(OutcomeKind::DeadLettered, _), Some(h)) = (at, holder) {
                    (key, replay_of) = (h, Some(marker));
                }
            } else {
                let claim = replay::Claim {
                    marker,
                    letter: 0,
                    stream_created: Some(u128::from(stream)),
                    key: Some(key_of(input.order).to_string()),
                };
                match replay::judge(&claim, u128::from(s.stream), at, Some(key_of(input.order))) {
                    Ok(Some(_)) => replay_of = Some(marker),
                    Ok(None) => orphan_letter = true,
                    Err(_) => {}
                }
            }
        }
        let delivery = Delivery {
            delivered: input.delivered,
            max_deliveries: self.max_deliveries,
            replay_of,
            orphan_letter,
            downstream: self.downstream,
            input_seq: input.seq,
        };
        (delivery, key)
    }

    /// The step a mutation makes of `step`.
    fn mutated(&self, step: Step) -> Step {
        match (self.mutation, step) {
            (Some(Mutation::AckWithoutOutcome), Step::Write { .. }) => Step::Ack,
            (Some(Mutation::NoKeep), Step::Keep { .. }) => Step::Ack,
            _ => step,
        }
    }

    /// The consumer delivers input `i` to a new worker (an overlap when another
    /// delivery of it is still in flight).
    fn deliver(&self, s: &State, i: usize) -> Option<State> {
        let mut s = s.clone();
        if s.inputs[i].in_flight > 0 {
            s.budget.overlaps -= 1;
        }
        s.inputs[i].delivered += 1;
        s.inputs[i].in_flight += 1;
        let order = s.inputs[i].order;
        for w in s.workers.iter_mut() {
            if s.inputs[w.input].order == order {
                w.alone_at_read = false;
                if w.charged && !s.suspect.contains(&order) {
                    s.suspect.push(order);
                }
            }
        }
        let (delivery, key) = self.delivery(&s, i);
        let mut machine = Machine::new(s.inputs[i].verdict, delivery);
        let step = machine.on(Event::Start);
        s.workers.push(Worker {
            input: i,
            machine,
            step,
            alone_at_read: false,
            charged: false,
            key,
        });
        Some(s)
    }

    /// Worker `w` dies at its current step.
    fn crash(&self, s: &State, w: usize) -> Option<State> {
        let mut s = s.clone();
        s.budget.crashes -= 1;
        let worker = s.end_delivery(w);
        let order = s.inputs[worker.input].order;
        if s.charged.contains(&order) && !s.suspect.contains(&order) {
            s.suspect.push(order);
        }
        Some(s)
    }

    /// `orderctl dlq replay` of letter `l`: a replay naming its marker and
    /// stream; a letter of an earlier stream is stored as a new input and
    /// removed (`SequenceOnly`: named by its old sequence all the same).
    fn replay(&self, s: &State, l: usize) -> Option<State> {
        let mut s = s.clone();
        s.budget.replays -= 1;
        let letter = s.letters[l].clone();
        let original = s.inputs.iter().find(|i| i.order == letter.order)?.clone();
        let earlier = letter.stream != s.stream && self.mutation != Some(Mutation::SequenceOnly);
        // The replay is a new input; the downstream is healthy by then, so
        // model its verdict as the original's.
        let claim = (!earlier).then_some((letter.marker, letter.stream));
        s.store(letter.order, original.verdict, claim);
        if earlier {
            s.letters[l].removed = true;
        }
        Some(s)
    }

    /// The input stream is deleted and created again (all processed): its
    /// messages go, sequences restart, the producer stores `after_recreation`.
    fn recreate_stream(&self, s: &State) -> Option<State> {
        let mut s = s.clone();
        s.budget.stream_recreations -= 1;
        for i in s.inputs.iter_mut() {
            i.removed = true;
        }
        for gone in std::mem::take(&mut s.outcomes) {
            let kind = gone.keeps.unwrap_or(gone.kind);
            s.aged_out.push((s.stream, gone.seq, gone.order, kind));
        }
        s.stream += 1;
        s.next_seq = 1;
        for (order, verdict) in &self.after_recreation {
            s.store(*order, *verdict, None);
        }
        Some(s)
    }

    /// The producer stores `order` again, after everything stored so far.
    fn republish(&self, s: &State, order: u8) -> Option<State> {
        let mut s = s.clone();
        s.budget.copies -= 1;
        let original = s.inputs.iter().find(|i| i.order == order)?.clone();
        s.store(original.order, original.verdict, None);
        Some(s)
    }

    /// `maxAge` removes the stream's oldest message.
    fn age_out(&self, s: &State) -> Option<State> {
        let mut s = s.clone();
        s.budget.removals -= 1;
        match s.oldest()? {
            Oldest::Input(i) => s.inputs[i].removed = true,
            Oldest::Outcome(o) => {
                let gone = s.outcomes.remove(o);
                let kind = gone.keeps.unwrap_or(gone.kind);
                s.aged_out.push((s.stream, gone.seq, gone.order, kind));
            }
        }
        Some(s)
    }

    /// The consumer is deleted and created again: it delivers every stored
    /// input again.
    fn recreate_consumer(&self, s: &State) -> Option<State> {
        let mut s = s.clone();
        s.budget.recreations -= 1;
        for i in s.inputs.iter_mut().filter(|i| !i.removed) {
            i.acked = false;
            i.delivered = 0;
        }
        Some(s)
    }

    /// Worker `w` carries out its step, `fault` picking the failing variant, and
    /// feeds the result to its machine (an ack or nak ends the delivery).
    fn run(&self, s: &State, w: usize, fault: Fault) -> Option<State> {
        let mut s = s.clone();
        if fault != Fault::None && fault != Fault::LostAck {
            s.budget.failures -= 1;
        }
        let Worker {
            input,
            mut machine,
            step,
            mut alone_at_read,
            mut charged,
            key,
        } = s.workers[w].clone();
        // The key it reads and writes; its event carries its input's order.
        let (order, carries) = (key, s.inputs[input].order);
        if step == Step::ReadOutcome {
            alone_at_read = s
                .workers
                .iter()
                .enumerate()
                .all(|(x, o)| x == w || s.inputs[o.input].order != order);
        }
        let step = self.mutated(step);
        let event = match (step, fault) {
            (Step::ReadOutcome, Fault::None) if self.mutation == Some(Mutation::BlindRead) => {
                Event::Read(None)
            }
            (Step::Write { kind, .. }, f)
                if self.mutation == Some(Mutation::UnconditionalWrite) =>
            {
                let last = s.last_on(order).unwrap_or(0);
                s.write_outcome(order, carries, kind, last, charged, f)
            }
            (Step::Write { kind, expect, .. }, f) if self.mutation == Some(Mutation::WrongKey) => {
                s.write_outcome(order.wrapping_add(100), carries, kind, expect, charged, f)
            }
            (Step::ReadOutcome, Fault::None) => Event::Read(s.last_on(order)),
            (Step::ReadOutcome, _) => Event::ReadFailed,
            (Step::CallDownstream, f) => {
                // The letter a judged replay may write over.
                let base = machine.delivery.replay_of.unwrap_or(0);
                s.call_downstream(order, base, alone_at_read, &mut charged, f)
            }
            (Step::Write { kind, expect, .. }, f) => {
                s.write_outcome(order, carries, kind, expect, charged, f)
            }
            (Step::Keep { over }, f) => s.keep_outcome(order, carries, over, f),
            (Step::RemoveLetter, Fault::None) => s.remove_letter(input),
            (Step::RemoveLetter, _) => Event::RemoveFailed,
            (Step::Ack, f) => {
                if f == Fault::LostAck {
                    s.budget.lost_acks -= 1;
                } else {
                    s.inputs[input].acked = true;
                }
                s.end_delivery(w);
                return Some(s);
            }
            (Step::Nak, _) => {
                s.end_delivery(w);
                return Some(s);
            }
        };
        let next = machine.on(event);
        s.workers[w] = Worker {
            input,
            machine,
            step: next,
            alone_at_read,
            charged,
            key,
        };
        Some(s)
    }
}

impl Model for V2 {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, (order, verdict))| Input {
                order: *order,
                verdict: *verdict,
                claim: None,
                seq: i as u64 + 1,
                acked: false,
                delivered: 0,
                in_flight: 0,
                removed: false,
            })
            .collect::<Vec<_>>();
        vec![State {
            next_seq: inputs.len() as u64 + 1,
            inputs,
            outcomes: Vec::new(),
            workers: Vec::new(),
            charged: Vec::new(),
            late_call: false,
            suspect: Vec::new(),
            finals_written: Vec::new(),
            aged_out: Vec::new(),
            letters: Vec::new(),
            stream: 0,
            budget: self.budget,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for (i, input) in s.inputs.iter().enumerate() {
            // Bounded: past max_deliveries + 1 every delivery's first write is a
            // dead letter, so more deliveries add nothing new.
            let b = &self.budget;
            let cap = u64::from(self.max_deliveries)
                + 1
                + u64::from(b.failures + b.crashes + b.lost_acks + b.overlaps);
            if !input.acked
                && !input.removed
                && input.delivered < cap
                && (input.in_flight == 0 || s.budget.overlaps > 0)
            {
                out.push(Action::Deliver(i));
            }
        }
        for (w, worker) in s.workers.iter().enumerate() {
            out.push(Action::Run {
                w,
                fault: Fault::None,
            });
            let failures = s.budget.failures > 0;
            match worker.step {
                Step::ReadOutcome | Step::RemoveLetter if failures => out.push(Action::Run {
                    w,
                    fault: Fault::Fail,
                }),
                Step::Write { .. } | Step::Keep { .. } if failures => {
                    out.push(Action::Run {
                        w,
                        fault: Fault::Fail,
                    });
                    out.push(Action::Run {
                        w,
                        fault: Fault::StoredButLost,
                    });
                }
                Step::CallDownstream if failures => {
                    out.push(Action::Run {
                        w,
                        fault: Fault::Fail,
                    });
                    out.push(Action::Run {
                        w,
                        fault: Fault::Refused,
                    });
                }
                Step::Ack if s.budget.lost_acks > 0 => out.push(Action::Run {
                    w,
                    fault: Fault::LostAck,
                }),
                _ => {}
            }
            if s.budget.crashes > 0 {
                out.push(Action::Crash(w));
            }
        }
        if s.budget.replays > 0 {
            for (l, letter) in s.letters.iter().enumerate() {
                if s.replayable(letter) {
                    out.push(Action::Replay(l));
                }
            }
        }
        // Time passing, between deliveries: a later copy of an order, the
        // oldest message aged out, the consumer recreated.
        if s.quiet() {
            // A re-send within the stream's memory of the order (its input or
            // an outcome still stored); after that, it is a new order to the
            // stream, whose deduplication horizon is its retention.
            if s.budget.copies > 0 {
                let mut orders: Vec<u8> = self.inputs.iter().map(|(o, _)| *o).collect();
                orders.dedup();
                orders.retain(|o| {
                    s.last_on(*o).is_some() || s.inputs.iter().any(|i| i.order == *o && !i.removed)
                });
                out.extend(orders.into_iter().map(Action::Republish));
            }
            // Limits remove messages only while every stored input is processed:
            // the operator holds maxAge above the oldest unprocessed one. (Not
            // modelled: an outcome older than a waiting later copy of its order
            // can age out while that copy waits; see the durability docs.)
            let processed = s.inputs.iter().all(|i| i.acked || i.removed);
            if s.budget.removals > 0 && processed && s.oldest().is_some() {
                out.push(Action::AgeOut);
            }
            if s.budget.recreations > 0 && processed {
                out.push(Action::RecreateConsumer);
            }
            if s.budget.stream_recreations > 0 && processed {
                out.push(Action::RecreateStream);
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        match action {
            Action::WindowPasses => None,
            Action::Republish(order) => self.republish(s, order),
            Action::AgeOut => self.age_out(s),
            Action::RecreateConsumer => self.recreate_consumer(s),
            Action::RecreateStream => self.recreate_stream(s),
            Action::Deliver(i) => self.deliver(s, i),
            Action::Crash(w) => self.crash(s, w),
            Action::Replay(seq) => self.replay(s, seq),
            Action::Run { w, fault } => self.run(s, w, fault),
        }
    }

    fn properties(&self) -> Vec<Property<Self>> {
        outcome_properties()
    }
}

/// The properties both models are checked against.
fn outcome_properties<M: Model<State = State>>() -> Vec<Property<M>> {
    vec![
        Property::always("at most one outcome per order", |_, s: &State| {
            chains_are_sound(s) && finals_once(s)
        }),
        Property::always(
            "no downstream call after the outcome exists",
            |_, s: &State| !s.late_call,
        ),
        Property::always("outcomes only for stored inputs", |_, s: &State| {
            s.outcomes
                .iter()
                .all(|o| s.inputs.iter().any(|i| i.order == o.order))
        }),
        Property::always("an outcome carries its own key's order", |_, s: &State| {
            s.outcomes.iter().all(|o| o.carries == o.order)
        }),
        Property::always(
            "when all is quiet every stored input is acked with exactly one outcome",
            |_, s: &State| {
                // Quiet: no delivery in flight and none left to make (a path can still
                // go on with a replay, which starts a new input).
                let quiet = s.workers.is_empty() && s.inputs.iter().all(|i| i.in_flight == 0);
                !quiet || !s.inputs.iter().all(|i| i.acked || i.removed) || final_outcomes_hold(s)
            },
        ),
        Property::eventually("every stored input is acked", |_, s: &State| {
            s.inputs.iter().all(|i| i.acked || i.removed) && final_outcomes_hold(s)
        }),
    ]
}

/// At the end: each stored input's order has an outcome, each live dead letter is
/// its order's current outcome, and the downstream charged only processed orders.
fn final_outcomes_hold(s: &State) -> bool {
    s.inputs
        .iter()
        .filter(|i| !i.removed)
        .all(|i| s.last_on(i.order).is_some())
        && chains_are_sound(s)
        && s.outcomes.iter().all(|o| {
            o.kind != OutcomeKind::DeadLettered
                || s.letters
                    .iter()
                    .any(|l| l.stream == s.stream && l.marker == o.seq && l.removed)
                || s.last_on(o.order) == Some(o.seq)
        })
        && s.charged.iter().all(|order| {
            s.suspect.contains(order) || s.current_kind(*order) == Some(OutcomeKind::Processed)
        })
}

/// Over the stream's whole life, at most one processed-or-rejected outcome was
/// written per order (the chains show only what the limits left).
fn finals_once(s: &State) -> bool {
    let mut seen = Vec::new();
    s.finals_written.iter().all(|o| {
        let first = !seen.contains(o);
        seen.push(*o);
        first
    })
}

/// Per order, the promise over its outcome chain ([`promise::check_chain`], the
/// statement the audit and the worker's tests use too).
fn chains_are_sound(s: &State) -> bool {
    let mut orders: Vec<u8> = s.outcomes.iter().map(|o| o.order).collect();
    orders.sort_unstable();
    orders.dedup();
    orders.iter().all(|order| {
        let mut chain: Vec<promise::Link> = s
            .outcomes
            .iter()
            .filter(|o| o.order == *order)
            .map(|o| promise::Link {
                seq: o.seq,
                kind: o.kind,
                supersedes: (o.over != 0).then_some(o.over),
            })
            .collect();
        chain.sort_by_key(|l| l.seq);
        promise::check_chain(&chain).iter().all(|b| {
            // What the first was written over aged out: archived, as in the audit.
            matches!(b, promise::Breach::FirstSupersedes { first }
                if first.supersedes.is_some_and(|x| s.aged_out.iter().any(|(st, seq, _, _)| *st == s.stream && *seq == x)))
        })
    })
}

/// Today's protocol (v1), for the counterexample. Steps of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum V1Step {
    /// Read the KV record; final -> ack as duplicate; else create/keep `pending`.
    Claim,
    Downstream,
    /// Publish the result event with `Nats-Msg-Id: <id>:<kind>` (dedup in window).
    Publish,
    /// KV compare-and-set to final; a failure NAKs (never dead-letters).
    Finalise,
    Ack,
    Nak,
    /// Last delivery after a transient failure: write the dead letter, mark the KV.
    DeadLetter,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct V1State {
    pub base: State,
    /// KV record per order: None, or whether it is final.
    pub kv_final: Vec<(u8, bool)>,
    /// Message ids the stream still deduplicates (inside the window).
    pub dedup: Vec<u8>,
    pub v1_workers: Vec<(usize, V1Step)>,
}

#[derive(Clone, Debug)]
pub struct V1 {
    pub inputs: Vec<(u8, Verdict)>,
    pub max_deliveries: u32,
    pub budget: Budget,
}

impl V1State {
    /// Claim: read the KV record; a final one acks the delivery as a duplicate,
    /// else the record is created (or kept) `pending`.
    fn claim(&mut self, order: u8) -> V1Step {
        let kv = self
            .kv_final
            .iter()
            .find(|(o, _)| *o == order)
            .map(|(_, f)| *f);
        match kv {
            Some(true) => V1Step::Ack,
            Some(false) => V1Step::Downstream,
            None => {
                self.kv_final.push((order, false));
                V1Step::Downstream
            }
        }
    }

    /// The downstream call; a failure goes to `transient`.
    fn call_downstream(&mut self, order: u8, failed: bool, transient: V1Step) -> V1Step {
        if self.base.last_on(order).is_some() {
            self.base.late_call = true;
        }
        if failed {
            transient
        } else {
            if !self.base.charged.contains(&order) {
                self.base.charged.push(order);
            }
            V1Step::Publish
        }
    }

    /// Publishes the result event, unless the stream still deduplicates its id.
    fn publish(&mut self, order: u8, verdict: Verdict) {
        if !self.dedup.contains(&order) {
            let kind = if verdict == Verdict::Reject {
                OutcomeKind::Rejected
            } else {
                OutcomeKind::Processed
            };
            let over = self.base.last_on(order).unwrap_or(0);
            let seq = self.base.next_seq;
            self.base.outcomes.push(Outcome {
                order,
                seq,
                kind,
                over,
                carries: order,
                keeps: None,
            });
            self.base.next_seq += 1;
            self.dedup.push(order);
        }
    }

    /// KV compare-and-set of the order's record to final.
    fn finalise(&mut self, order: u8) {
        for (o, f) in self.kv_final.iter_mut() {
            if *o == order {
                *f = true;
            }
        }
    }

    /// Writes the dead letter and marks the order's KV record final.
    fn dead_letter(&mut self, order: u8) {
        let over = self.base.last_on(order).unwrap_or(0);
        let seq = self.base.next_seq;
        self.base.outcomes.push(Outcome {
            order,
            seq,
            kind: OutcomeKind::DeadLettered,
            over,
            carries: order,
            keeps: None,
        });
        self.base.next_seq += 1;
        match self.kv_final.iter_mut().find(|(o, _)| *o == order) {
            Some((_, f)) => *f = true,
            None => self.kv_final.push((order, true)),
        }
    }
}

impl V1 {
    /// The consumer delivers input `i` to a new worker, which starts at Claim.
    fn deliver(&self, s: &V1State, i: usize) -> Option<V1State> {
        let mut s = s.clone();
        let b = &mut s.base;
        if b.inputs[i].in_flight > 0 {
            b.budget.overlaps -= 1;
        }
        b.inputs[i].delivered += 1;
        b.inputs[i].in_flight += 1;
        s.v1_workers.push((i, V1Step::Claim));
        Some(s)
    }

    /// Worker `w` dies at its current step.
    fn crash(&self, s: &V1State, w: usize) -> Option<V1State> {
        let mut s = s.clone();
        s.base.budget.crashes -= 1;
        let (i, _) = s.v1_workers.remove(w);
        s.base.inputs[i].in_flight -= 1;
        Some(s)
    }

    /// The stream's duplicate window passes: it forgets the message ids.
    fn window_passes(&self, s: &V1State) -> Option<V1State> {
        let mut s = s.clone();
        s.base.budget.windows -= 1;
        s.dedup.clear();
        Some(s)
    }

    /// Worker `w` carries out its step (`Fault::Fail`: the step fails).
    fn run(&self, s: &V1State, w: usize, fault: Fault) -> Option<V1State> {
        let mut s = s.clone();
        let failed = fault == Fault::Fail;
        if failed {
            s.base.budget.failures -= 1;
        }
        let (i, step) = s.v1_workers[w];
        let order = s.base.inputs[i].order;
        let verdict = s.base.inputs[i].verdict;
        let last = s.base.inputs[i].delivered >= u64::from(self.max_deliveries);
        let transient = if last {
            V1Step::DeadLetter
        } else {
            V1Step::Nak
        };
        let next = match step {
            V1Step::Claim if failed => transient,
            V1Step::Claim => s.claim(order),
            V1Step::Downstream => s.call_downstream(order, failed, transient),
            V1Step::Publish if failed => transient,
            V1Step::Publish => {
                s.publish(order, verdict);
                V1Step::Finalise
            }
            V1Step::Finalise if failed => V1Step::Nak,
            V1Step::Finalise => {
                s.finalise(order);
                V1Step::Ack
            }
            V1Step::DeadLetter => {
                s.dead_letter(order);
                V1Step::Ack
            }
            V1Step::Ack | V1Step::Nak => {
                if step == V1Step::Ack && !failed {
                    s.base.inputs[i].acked = true;
                }
                s.base.inputs[i].in_flight -= 1;
                s.v1_workers.remove(w);
                return Some(s);
            }
        };
        s.v1_workers[w] = (i, next);
        Some(s)
    }
}

impl Model for V1 {
    type State = V1State;
    type Action = Action;

    fn init_states(&self) -> Vec<V1State> {
        let v2 = V2 {
            inputs: self.inputs.clone(),
            max_deliveries: self.max_deliveries,
            downstream: true,
            budget: self.budget,
            mutation: None,
            after_recreation: Vec::new(),
        };
        v2.init_states()
            .into_iter()
            .map(|base| V1State {
                base,
                kv_final: Vec::new(),
                dedup: Vec::new(),
                v1_workers: Vec::new(),
            })
            .collect()
    }

    fn actions(&self, s: &V1State, out: &mut Vec<Action>) {
        let b = &s.base;
        for (i, input) in b.inputs.iter().enumerate() {
            if !input.acked
                && input.delivered < u64::from(self.max_deliveries) + 1
                && (input.in_flight == 0 || b.budget.overlaps > 0)
            {
                out.push(Action::Deliver(i));
            }
        }
        for w in 0..s.v1_workers.len() {
            out.push(Action::Run {
                w,
                fault: Fault::None,
            });
            if b.budget.failures > 0 {
                out.push(Action::Run {
                    w,
                    fault: Fault::Fail,
                });
            }
            if b.budget.crashes > 0 {
                out.push(Action::Crash(w));
            }
        }
        if b.budget.windows > 0 && !s.dedup.is_empty() {
            out.push(Action::WindowPasses);
        }
    }

    fn next_state(&self, s: &V1State, action: Action) -> Option<V1State> {
        match action {
            Action::Deliver(i) => self.deliver(s, i),
            Action::Crash(w) => self.crash(s, w),
            Action::WindowPasses => self.window_passes(s),
            Action::Replay(_)
            | Action::Republish(_)
            | Action::AgeOut
            | Action::RecreateConsumer
            | Action::RecreateStream => None,
            Action::Run { w, fault } => self.run(s, w, fault),
        }
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![Property::always(
            "at most one outcome per order",
            |_, s: &V1State| chains_are_sound(&s.base),
        )]
    }
}

/// Bounds that make every path end and keep the checks under a minute here.
pub fn default_budget() -> Budget {
    Budget {
        crashes: 2,
        failures: 3,
        lost_acks: 1,
        overlaps: 1,
        replays: 1,
        windows: 0,
        copies: 0,
        removals: 0,
        recreations: 0,
        stream_recreations: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stateright::Checker;

    fn check_v2(name: &str, model: V2) {
        let started = std::time::Instant::now();
        let checker = model.checker().threads(2).spawn_bfs().join();
        checker.assert_properties();
        let (states, depth) = (checker.unique_state_count(), checker.max_depth());
        eprintln!(
            "model v2, {name}: {states} distinct states, depth {depth}, {:.1}s",
            started.elapsed().as_secs_f64()
        );
        assert!(states > 1000, "the model explored only {states} states");
    }

    #[test]
    fn v2_one_order_with_a_downstream_under_every_fault() {
        check_v2(
            "one order, downstream, 2 crashes, 3 failures, 1 lost ack, 1 overlap, 1 replay",
            V2 {
                inputs: vec![(0, Verdict::Process)],
                max_deliveries: 2,
                downstream: true,
                budget: default_budget(),
                mutation: None,
                after_recreation: Vec::new(),
            },
        );
    }

    #[test]
    fn v2_the_same_order_stored_twice() {
        check_v2(
            "one order stored twice (re-published after the duplicate window), 1 crash, 1 failure, 1 lost ack, 1 overlap, 1 replay",
            V2 {
                inputs: vec![(0, Verdict::Process), (0, Verdict::Process)],
                max_deliveries: 2,
                downstream: true,
                budget: Budget {
                    crashes: 1,
                    failures: 1,
                    lost_acks: 1,
                    overlaps: 1,
                    replays: 1,
                    ..default_budget()
                },
                mutation: None,
                after_recreation: Vec::new(),
            },
        );
    }

    #[test]
    fn v2_an_undecodable_input() {
        check_v2(
            "one undecodable input, 2 crashes, 3 failures, 1 lost ack, 1 overlap, 1 replay",
            V2 {
                inputs: vec![(0, Verdict::DeadLetter)],
                max_deliveries: 2,
                downstream: false,
                budget: default_budget(),
                mutation: None,
                after_recreation: Vec::new(),
            },
        );
    }

    #[test]
    fn v2_a_rejected_order_and_two_replays() {
        check_v2(
            "one invalid order, 1 crash, 2 failures, 1 lost ack, 1 overlap, 2 replays",
            V2 {
                inputs: vec![(0, Verdict::Reject)],
                max_deliveries: 1,
                downstream: false,
                budget: Budget {
                    crashes: 1,
                    failures: 2,
                    replays: 2,
                    ..default_budget()
                },
                mutation: None,
                after_recreation: Vec::new(),
            },
        );
    }

    /// Time and identity: a later copy of the order stored after its outcome,
    /// the oldest messages aged out (inputs only once acknowledged), the consumer
    /// recreated so every stored input is delivered again.
    #[test]
    fn v2_a_later_copy_outlives_the_first_and_its_outcome() {
        check_v2(
            "two orders, a later copy, 4 messages aged out, the consumer recreated, 1 crash, 1 failure, 1 lost ack",
            V2 {
                inputs: vec![(0, Verdict::Process), (1, Verdict::Reject)],
                max_deliveries: 2,
                downstream: true,
                budget: Budget {
                    crashes: 1,
                    failures: 1,
                    lost_acks: 1,
                    overlaps: 0,
                    replays: 0,
                    windows: 0,
                    copies: 1,
                    removals: 4,
                    recreations: 1,
                    stream_recreations: 0,
                },
                mutation: None,
                after_recreation: Vec::new(),
            },
        );
    }

    /// Identity: an order dead-lettered, the input stream deleted and created
    /// again (sequences restart, the DLQ keeps the letter), a second order
    /// dead-lettered at the sequence the first one's marker had, and replays of
    /// both letters: the old letter never writes the second order's outcome.
    #[test]
    fn v2_an_old_letter_after_the_stream_is_recreated() {
        check_v2(
            "two poison orders, the stream recreated between them, 2 replays, 1 crash, 1 failure, 1 lost ack",
            old_letter(
                None,
                Budget {
                    crashes: 1,
                    failures: 1,
                    lost_acks: 1,
                    overlaps: 0,
                    replays: 2,
                    ..default_budget()
                },
            ),
        );
    }

    /// Order 0 dead-lettered in the first stream, order 1 in the recreated one.
    fn old_letter(mutation: Option<Mutation>, budget: Budget) -> V2 {
        V2 {
            inputs: vec![(0, Verdict::DeadLetter)],
            max_deliveries: 1,
            downstream: false,
            budget: Budget {
                stream_recreations: 1,
                ..budget
            },
            mutation,
            after_recreation: vec![(1, Verdict::DeadLetter)],
        }
    }

    /// The counterexample the checker finds for `property` in `model`, one line
    /// per action, with the outcomes ever written at its end.
    fn counterexample(model: V2, property: &'static str) -> Vec<String> {
        // One thread: breadth first in order, so the path is a shortest one.
        let checker = model.clone().checker().threads(1).spawn_bfs().join();
        let path = checker
            .discovery(property)
            .unwrap_or_else(|| panic!("{:?}: no counterexample for {property:?}", model.mutation));
        let mut steps = path.into_vec();
        // The path ends where the invariant first fails (the checker may report
        // it further on).
        let holds = model
            .properties()
            .into_iter()
            .find(|p| p.name == property)
            .expect("the property")
            .condition;
        if let Some(first) = steps.iter().position(|(st, _)| !holds(&model, st)) {
            steps.truncate(first + 1);
        }
        let mut lines = Vec::new();
        for (state, action) in &steps {
            let Some(action) = action else { continue };
            lines.push(match action {
                Action::Deliver(i) => {
                    format!("the consumer delivers input {}", state.inputs[*i].seq)
                }
                Action::Run { w, fault } => {
                    let worker = &state.workers[*w];
                    format!(
                        "worker (input {}): {:?}{}",
                        state.inputs[worker.input].seq,
                        model.mutated(worker.step),
                        match fault {
                            Fault::None => String::new(),
                            f => format!(" ({f:?})"),
                        }
                    )
                }
                Action::Crash(w) => format!("a worker dies during {:?}", state.workers[*w].step),
                Action::Republish(o) => format!("the producer stores order {o} again"),
                Action::AgeOut => "maxAge removes the oldest message".to_string(),
                Action::RecreateConsumer => "the consumer is recreated".to_string(),
                Action::RecreateStream => {
                    "the input stream is deleted and created again".to_string()
                }
                Action::Replay(l) => {
                    let letter = &state.letters[*l];
                    format!(
                        "orderctl replays the letter of order {} (marker {} in stream {})",
                        letter.order, letter.marker, letter.stream
                    )
                }
                other => format!("{other:?}"),
            });
        }
        let last = &steps.last().expect("a path").0;
        lines.push(format!(
            "=> outcomes stored {:?}; processed-or-rejected written over time for orders {:?}",
            last.outcomes
                .iter()
                .map(|o| (o.seq, o.kind.token()))
                .collect::<Vec<_>>(),
            last.finals_written
        ));
        for o in last.outcomes.iter().filter(|o| o.carries != o.order) {
            lines.push(format!(
                "=> outcome {} ({}) is under order {}'s key but carries order {}",
                o.seq,
                o.kind.token(),
                o.order,
                o.carries
            ));
        }
        eprintln!(
            "mutation {:?} breaks {property:?}; counterexample:\n  {}",
            model.mutation.unwrap(),
            lines.join("\n  ")
        );
        lines
    }

    fn one_order(mutation: Mutation, budget: Budget) -> V2 {
        V2 {
            inputs: vec![(0, Verdict::Process)],
            max_deliveries: 2,
            downstream: true,
            budget,
            mutation: Some(mutation),
            after_recreation: Vec::new(),
        }
    }

    fn quiet_budget() -> Budget {
        Budget {
            crashes: 0,
            failures: 0,
            lost_acks: 0,
            overlaps: 0,
            replays: 0,
            ..default_budget()
        }
    }

    #[test]
    fn mutation_unconditional_write_breaks_at_most_one_outcome() {
        let budget = Budget {
            overlaps: 1,
            ..quiet_budget()
        };
        let lines = counterexample(
            one_order(Mutation::UnconditionalWrite, budget),
            "at most one outcome per order",
        );
        assert!(
            lines.iter().filter(|l| l.contains("Write")).count() >= 2,
            "{lines:?}"
        );
    }

    #[test]
    fn mutation_blind_read_breaks_no_call_after_the_outcome() {
        let budget = Budget {
            lost_acks: 1,
            ..quiet_budget()
        };
        let lines = counterexample(
            one_order(Mutation::BlindRead, budget),
            "no downstream call after the outcome exists",
        );
        assert!(lines.iter().any(|l| l.contains("LostAck")), "{lines:?}");
    }

    #[test]
    fn mutation_ack_without_outcome_breaks_exactly_one_outcome_when_quiet() {
        counterexample(
            one_order(Mutation::AckWithoutOutcome, quiet_budget()),
            "when all is quiet every stored input is acked with exactly one outcome",
        );
    }

    #[test]
    fn mutation_wrong_key_breaks_outcomes_only_for_stored_inputs() {
        counterexample(
            one_order(Mutation::WrongKey, quiet_budget()),
            "outcomes only for stored inputs",
        );
    }

    #[test]
    fn mutation_no_keep_breaks_at_most_one_outcome_over_time() {
        let budget = Budget {
            copies: 1,
            removals: 2,
            recreations: 1,
            ..quiet_budget()
        };
        let lines = counterexample(
            one_order(Mutation::NoKeep, budget),
            "at most one outcome per order",
        );
        assert!(lines.iter().any(|l| l.contains("recreated")), "{lines:?}");
    }

    #[test]
    fn mutation_sequence_only_breaks_outcomes_carry_their_order() {
        let budget = Budget {
            replays: 1,
            ..quiet_budget()
        };
        let lines = counterexample(
            old_letter(Some(Mutation::SequenceOnly), budget),
            "an outcome carries its own key's order",
        );
        assert!(
            lines.iter().any(|l| l.contains("created again")),
            "{lines:?}"
        );
    }

    #[test]
    fn v1_has_a_counterexample_past_the_duplicate_window() {
        let checker = V1 {
            inputs: vec![(0, Verdict::Process)],
            max_deliveries: 3,
            budget: Budget {
                crashes: 1,
                failures: 1,
                lost_acks: 0,
                overlaps: 0,
                replays: 0,
                windows: 1,
                ..default_budget()
            },
        }
        .checker()
        .threads(2)
        .spawn_bfs()
        .join();
        let path = checker
            .discovery("at most one outcome per order")
            .expect("the checker finds v1's second outcome");
        let steps = path.into_vec();
        let mut lines = Vec::new();
        for (state, action) in &steps {
            let Some(action) = action else { continue };
            lines.push(match action {
                Action::Deliver(_) => "the consumer delivers the order".to_string(),
                Action::Crash(w) => format!("the worker dies during {:?}", state.v1_workers[*w].1),
                Action::WindowPasses => "the duplicate window passes".to_string(),
                Action::Run { w, fault } => format!(
                    "worker: {:?}{}",
                    state.v1_workers[*w].1,
                    if *fault == Fault::Fail { " fails" } else { "" }
                ),
                other => format!("{other:?}"),
            });
        }
        let Some((last, _)) = steps.last() else {
            panic!("empty counterexample");
        };
        eprintln!(
            "model v1 (the protocol before v2): {} distinct states; counterexample:\n  {}\n  => OrderProcessed events for the order: {}",
            checker.unique_state_count(),
            lines.join("\n  "),
            last.base
                .outcomes
                .iter()
                .filter(|o| o.kind == OutcomeKind::Processed)
                .count()
        );
        assert!(
            lines.iter().any(|l| l.contains("window passes")),
            "{lines:?}"
        );
    }
}
