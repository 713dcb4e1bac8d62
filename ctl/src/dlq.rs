//! `orderctl dlq list|show|replay`: the pipeline's dead letters, and their
//! replay as new inputs that name the letter they supersede.

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use bytes::Bytes;
use orderpipeline_common::names;
use orderpipeline_common::nats::source_sequence;
use orderpipeline_proto::{DeadLetter, Message as _};

use crate::target::{Binding, Session};

/// `orderctl dlq`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM, global = true)]
    pub dlq_stream: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// List dead letters.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter in full.
    Show { sequence: u64 },
    /// Re-submit dead letters for processing (one sequence, or --all).
    Replay {
        sequence: Option<u64>,
        #[arg(long)]
        all: bool,
    },
}

impl Args {
    pub fn bind(&mut self, b: &Binding<'_>) -> anyhow::Result<()> {
        b.name(&mut self.dlq_stream, "dlq_stream", &b.pipeline.dlq_stream)
    }
}

pub async fn run(s: &Session, args: Args) -> anyhow::Result<()> {
    let dlq = args.dlq_stream.as_str();
    match args.command {
        Command::List { limit } => {
            let letters = dlq_list(&s.js, dlq, limit).await?;
            if s.json {
                let v: Vec<_> = letters.iter().map(list_json).collect();
                return s.print_json(&v);
            }
            print!("{}", list_human(&letters));
        }
        Command::Show { sequence } => {
            let letters = dlq_list(&s.js, dlq, usize::MAX).await?;
            let l = letters
                .iter()
                .find(|l| l.dlq_sequence == sequence)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no dead letter with sequence {sequence} in {dlq}; see `orderctl dlq list`"
                    )
                })?;
            print!("{}", show_human(l));
        }
        Command::Replay { sequence, all } => replay(s, dlq, sequence, all).await?,
    }
    Ok(())
}

async fn replay(s: &Session, dlq: &str, sequence: Option<u64>, all: bool) -> anyhow::Result<()> {
    let seqs: Vec<u64> = match (sequence, all) {
        (Some(seq), false) => vec![seq],
        (None, true) => dlq_list(&s.js, dlq, usize::MAX)
            .await?
            .iter()
            .map(|l| l.dlq_sequence)
            .collect(),
        _ => anyhow::bail!("give one dead-letter sequence or --all"),
    };
    for seq in seqs {
        let how = dlq_replay(&s.js, dlq, seq).await?;
        println!(
            "replayed dead letter {seq} (replay of {how}); the worker removes the letter once the replay has its outcome"
        );
    }
    Ok(())
}

fn list_json(l: &StoredDeadLetter) -> serde_json::Value {
    serde_json::json!({
        "sequence": l.dlq_sequence,
        "order_id": l.letter.order_id,
        "class": l.letter.error_class().label(),
        "error": l.letter.error_message,
        "original_stream_sequence": l.letter.original_stream_sequence,
        "delivery_count": l.letter.delivery_count,
    })
}

fn list_human(letters: &[StoredDeadLetter]) -> String {
    let mut out = format!(
        "{:>6}  {:<20} {:<18} {:>8}  error\n",
        "seq", "order", "class", "orig seq"
    );
    for l in letters {
        let order = if l.letter.order_id.is_empty() {
            "-"
        } else {
            &l.letter.order_id
        };
        out.push_str(&format!(
            "{:>6}  {:<20} {:<18} {:>8}  {}\n",
            l.dlq_sequence,
            order,
            l.letter.error_class().label(),
            l.letter.original_stream_sequence,
            l.letter.error_message
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", letters.len()));
    out
}

fn show_human(l: &StoredDeadLetter) -> String {
    let d = &l.letter;
    let mut lines = vec![format!("sequence:        {}", l.dlq_sequence)];
    if let Some(m) = l.marker {
        lines.push(format!(
            "marker:          {} seq {m} (the order's outcome record)",
            d.original_stream
        ));
    }
    lines.push(format!("order id:        {}", d.order_id));
    lines.push(format!("class:           {}", d.error_class().label()));
    lines.push(format!("error:           {}", d.error_message));
    lines.push(format!(
        "original:        {} seq {} on {}",
        d.original_stream, d.original_stream_sequence, d.original_subject
    ));
    lines.push(format!("deliveries:      {}", d.delivery_count));
    lines.push(format!("worker:          {}", d.worker));
    lines.push(if d.payload_truncated {
        format!(
            "payload:         first {} of {} bytes (truncated to fit the dead-letter stream)",
            d.payload.len(),
            d.payload_size
        )
    } else {
        format!("payload:         {} bytes", d.payload.len())
    });
    for h in &d.headers {
        lines.push(format!("header:          {}: {}", h.name, h.value));
    }
    lines.join("\n") + "\n"
}

/// One dead letter as stored.
#[derive(Clone, Debug)]
pub struct StoredDeadLetter {
    pub dlq_sequence: u64,
    /// Its marker (the `deadlettered` outcome) in the input stream, when the
    /// server copied it from there; `None` for letters written by earlier versions.
    pub marker: Option<u64>,
    pub letter: DeadLetter,
}

/// Every dead letter in the DLQ stream, oldest first (at most `limit`).
pub async fn dlq_list(
    js: &jetstream::Context,
    dlq_stream: &str,
    limit: usize,
) -> anyhow::Result<Vec<StoredDeadLetter>> {
    let mut s = js
        .get_stream(dlq_stream)
        .await
        .with_context(|| format!("dead-letter stream {dlq_stream}"))?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if out.len() >= limit {
            break;
        }
        match s.get_raw_message(seq).await {
            Ok(m) => {
                let letter = DeadLetter::decode(m.payload.as_ref())
                    .with_context(|| format!("dead letter {seq} is not an orders.v1.DeadLetter"))?;
                out.push(StoredDeadLetter {
                    dlq_sequence: seq,
                    marker: source_sequence(&m.headers),
                    letter,
                });
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Replays dead letter `dlq_sequence`: re-submits the original payload to its
/// subject as a new input naming the letter it supersedes
/// (`Orderpipeline-Replay-Of: <marker>/<dlq seq>`). The worker gives the replay
/// its outcome (written over the letter's marker, so the order still has one
/// outcome) and then removes the letter. Replaying the same letter twice has one
/// effect: only one replay can write over the marker.
pub async fn dlq_replay(
    js: &jetstream::Context,
    dlq_stream: &str,
    dlq_sequence: u64,
) -> anyhow::Result<String> {
    let s = js
        .get_stream(dlq_stream)
        .await
        .with_context(|| format!("dead-letter stream {dlq_stream}"))?;
    let m = match s.get_raw_message(dlq_sequence).await {
        Ok(m) => m,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
            anyhow::bail!(
                "dead letter {dlq_sequence} is not in {dlq_stream} (already replayed and removed, or never there); see `orderctl dlq list`"
            )
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading dead letter {dlq_sequence} in {dlq_stream}"
            )));
        }
    };
    let letter = DeadLetter::decode(m.payload.as_ref())
        .with_context(|| format!("dead letter {dlq_sequence} is not an orders.v1.DeadLetter"))?;
    anyhow::ensure!(
        !letter.payload_truncated,
        "dead letter {dlq_sequence} keeps only the first {} of the original {} bytes (the payload was too large for the dead-letter stream), so it cannot be replayed; publish the order again from its source",
        letter.payload.len(),
        letter.payload_size
    );
    let named = Named::of(&m.headers, dlq_sequence);
    let current = stream_created(js, &letter.original_stream).await?;
    let replay = named.replay_of(current);
    js.publish_with_headers(
        letter.original_subject.clone(),
        replay_headers(&letter, replay.as_ref()),
        Bytes::from(letter.payload.clone()),
    )
    .await?
    .await
    .context("re-submitting the order")?;
    let Some(r) = replay else {
        // No marker to supersede (a letter from an earlier version, or one whose
        // stream was deleted and created again since: its marker is gone and
        // its sequence may be another order's now): the replay is an ordinary
        // input, and the letter goes now.
        s.delete_message(dlq_sequence)
            .await
            .with_context(|| format!("removing dead letter {dlq_sequence} after replay"))?;
        return Ok(match named.marker {
            None => format!("legacy letter {dlq_sequence}"),
            Some(_) => format!(
                "letter {dlq_sequence} of an earlier stream {}, as a new input",
                letter.original_stream
            ),
        });
    };
    Ok(r.of)
}

/// How a letter names its marker: its sequence (from the server's copy header)
/// and, for letters of this version, its key and its stream's identity.
struct Named {
    marker: Option<u64>,
    key: Option<String>,
    stream_created: Option<String>,
    letter: u64,
}

/// The headers that make a replay supersede exactly its letter.
struct ReplayOf {
    /// `<marker>/<letter>`
    of: String,
    key: Option<String>,
    stream_created: Option<String>,
}

impl Named {
    fn of(headers: &HeaderMap, letter: u64) -> Self {
        let text = |name: &str| headers.get(name).map(|v| v.to_string());
        Self {
            marker: source_sequence(headers),
            key: text(names::KEY_HEADER),
            stream_created: text(names::STREAM_CREATED_HEADER),
            letter,
        }
    }

    /// The replay's claim, unless the letter's marker is gone for sure: no
    /// marker, or a marker in an earlier stream of the same name (`current` is
    /// the live stream's creation time, `None` when it does not exist).
    fn replay_of(&self, current: Option<u128>) -> Option<ReplayOf> {
        let marker = self.marker?;
        if let Some(named) = &self.stream_created
            && current.map(|c| c.to_string()).as_deref() != Some(named.as_str())
        {
            return None;
        }
        Some(ReplayOf {
            of: format!("{marker}/{}", self.letter),
            key: self.key.clone(),
            stream_created: self.stream_created.clone(),
        })
    }
}

/// The creation time (ns) of the input stream, `None` when it does not exist.
async fn stream_created(js: &jetstream::Context, stream: &str) -> anyhow::Result<Option<u128>> {
    match js.get_stream(stream).await {
        Ok(mut s) => Ok(Some(orderpipeline_common::topology::unix_ns(
            s.info().await?.created,
        ))),
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading stream {stream}"))),
    }
}

/// The replay's headers: the letter it supersedes (by sequence, key and the
/// stream's identity) and the original trace context.
fn replay_headers(letter: &DeadLetter, replay: Option<&ReplayOf>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(r) = replay {
        headers.insert(names::REPLAY_OF_HEADER, r.of.as_str());
        if let Some(k) = &r.key {
            headers.insert(names::REPLAY_KEY_HEADER, k.as_str());
        }
        if let Some(c) = &r.stream_created {
            headers.insert(names::REPLAY_STREAM_HEADER, c.as_str());
        }
    }
    for h in &letter.headers {
        let lower = h.name.to_ascii_lowercase();
        if (lower == "traceparent" || lower == "tracestate")
            && let Ok(value) = h.value.parse::<async_nats::HeaderValue>()
        {
            headers.insert(lower.as_str(), value);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderpipeline_proto::{ErrorClass, Header};

    fn letter() -> StoredDeadLetter {
        StoredDeadLetter {
            dlq_sequence: 4,
            marker: Some(17),
            letter: DeadLetter {
                original_subject: "ORDER.created".into(),
                original_stream: "ORDERS".into(),
                original_stream_sequence: 12,
                payload: vec![1, 2, 3],
                headers: vec![
                    Header {
                        name: "Traceparent".into(),
                        value: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                    },
                    Header {
                        name: "Nats-Msg-Id".into(),
                        value: "o-1".into(),
                    },
                ],
                error_class: ErrorClass::AttemptsExhausted as i32,
                error_message: "downstream failed 3 time(s)".into(),
                delivery_count: 5,
                order_id: "o-1".into(),
                worker: "w-1".into(),
                payload_size: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_listed_letter_shows_its_class_label() {
        let out = list_human(&[letter()]);
        assert!(out.contains("     4  o-1                  attempts_exhausted       12  downstream failed 3 time(s)"), "{out}");
        assert!(out.ends_with("1 dead letter(s)\n"), "{out}");
        assert_eq!(list_json(&letter())["class"], "attempts_exhausted");
    }

    #[test]
    fn a_shown_letter_names_its_marker_and_payload() {
        let out = show_human(&letter());
        assert!(
            out.contains("marker:          ORDERS seq 17 (the order's outcome record)"),
            "{out}"
        );
        assert!(out.contains("payload:         3 bytes"), "{out}");
        let mut l = letter();
        l.letter.payload_truncated = true;
        l.letter.payload_size = 9_000_000;
        assert!(show_human(&l).contains("first 3 of 9000000 bytes (truncated"));
    }

    #[test]
    fn a_replay_names_its_letter_and_keeps_only_the_trace_context() {
        let mut stored = HeaderMap::new();
        stored.insert("Nats-Stream-Source", "ORDERS 17 > >");
        stored.insert(names::KEY_HEADER, "o-1");
        stored.insert(names::STREAM_CREATED_HEADER, "1000");
        let r = Named::of(&stored, 4).replay_of(Some(1000));
        let h = replay_headers(&letter().letter, r.as_ref());
        let get = |n: &str| h.get(n).map(|v| v.to_string());
        assert_eq!(get(names::REPLAY_OF_HEADER).as_deref(), Some("17/4"));
        assert_eq!(get(names::REPLAY_KEY_HEADER).as_deref(), Some("o-1"));
        assert_eq!(get(names::REPLAY_STREAM_HEADER).as_deref(), Some("1000"));
        assert!(h.get("traceparent").is_some());
        assert!(h.get("Nats-Msg-Id").is_none(), "a replay is a new message");
    }

    #[test]
    fn a_letter_of_an_earlier_stream_is_replayed_as_a_new_input() {
        let mut stored = HeaderMap::new();
        stored.insert("Nats-Stream-Source", "ORDERS 2 > >");
        stored.insert(names::STREAM_CREATED_HEADER, "1000");
        let named = Named::of(&stored, 9);
        assert!(named.replay_of(Some(2000)).is_none(), "recreated since");
        assert!(named.replay_of(None).is_none(), "deleted since");
        assert!(named.replay_of(Some(1000)).is_some());
        // A letter of an earlier version names no stream: trusted as before.
        let mut old = HeaderMap::new();
        old.insert("Nats-Stream-Source", "ORDERS 2 > >");
        assert!(Named::of(&old, 9).replay_of(Some(2000)).is_some());
        assert!(
            Named::of(&HeaderMap::new(), 9)
                .replay_of(Some(2000))
                .is_none()
        );
    }
}
