//! A job's life cycle: its state ([`JobState`]), the phase it is in ([`Phase`]), and
//! the legal moves between them ([`legal`]), in one place. The stores keep both as
//! text, written and parsed only here.
//!
//! ```text
//!  queued ──> running(models) ──> running(identify) ──> running(finish) ──> done
//!                  │                                      │  ▲      │
//!                  │                                      │  │      └─> awaiting_labels(finish)
//!                  │                                      ▼  │              │ labels stored
//!                  │                         running(finetune:r) ─┐         ▼
//!                  │                                   ▲          │  running(finish) ...
//!                  │                                   └── r + 1 ─┘
//!  any phase ──> failed | cancelled         (a final state is never left)
//! ```
//!
//! Workers lease from a job's shard sets ([`Stage`]): the identify shards while the
//! job is in `identify`, round `r`'s parts while it is in `finetune:r`. A round is part
//! of its job: its parts fail, cancel and delete with it.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    AwaitingLabels,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::AwaitingLabels => "awaiting_labels",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::AwaitingLabels,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Why a failed job failed, for clients that act on it: `Input` (its config, data,
/// models or labels are bad: fix them and submit again; `defuse run` exits 2) or
/// `Runtime` (anything else: I/O, a worker's computation, lost state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Input,
    Runtime,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Input => "input",
            ErrorKind::Runtime => "runtime",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        [ErrorKind::Input, ErrorKind::Runtime]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The step a job is in (with its [`JobState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Loading or training the models and planning identify (central).
    Models,
    /// Workers search the shards.
    Identify,
    /// Distill, pictures, label, correct, report (central); also while the job waits
    /// for labels.
    Finish,
    /// Fine-tune round `r` runs on the workers.
    FineTune(usize),
    /// The state store lost the job; it was recorded again as failed.
    Lost,
}

impl Phase {
    /// The text the stores keep (`models`, `identify`, `finish`, `finetune:<r>`,
    /// `lost`).
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "models" => Phase::Models,
            "identify" => Phase::Identify,
            "finish" => Phase::Finish,
            "lost" => Phase::Lost,
            s => Phase::FineTune(s.strip_prefix("finetune:")?.parse().ok()?),
        })
    }

    /// The round of a [`Phase::FineTune`].
    pub fn round(&self) -> Option<usize> {
        match self {
            Phase::FineTune(r) => Some(*r),
            _ => None,
        }
    }

    /// Whether workers lease shards of a running job in this phase.
    pub fn leasable(&self) -> bool {
        Stage::of(*self).is_some()
    }
}

/// A set of shards of a job that workers lease: the identify step's shards, or the
/// parts of one fine-tune round. Each has its own pending queue, leases and attempts
/// in the store; the job's record holds them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Identify,
    /// The parts of fine-tune round `r`.
    Round(u32),
}

impl Stage {
    /// The phase the job is in while workers lease from this set.
    pub fn phase(self) -> Phase {
        match self {
            Stage::Identify => Phase::Identify,
            Stage::Round(r) => Phase::FineTune(r as usize),
        }
    }

    /// The set workers lease from in `phase`, if any.
    pub fn of(phase: Phase) -> Option<Stage> {
        match phase {
            Phase::Identify => Some(Stage::Identify),
            Phase::FineTune(r) => Some(Stage::Round(r as u32)),
            _ => None,
        }
    }

    /// How messages name a shard of this set: `shard 3`, `round 1 part 3`.
    pub fn unit(self, shard: u32) -> String {
        format!("{}{shard}", self.unit_prefix())
    }

    /// [`Stage::unit`] without the number (what the Redis scripts append it to).
    pub fn unit_prefix(self) -> String {
        match self {
            Stage::Identify => "shard ".into(),
            Stage::Round(r) => format!("round {r} part "),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Models => f.write_str("models"),
            Phase::Identify => f.write_str("identify"),
            Phase::Finish => f.write_str("finish"),
            Phase::FineTune(r) => write!(f, "finetune:{r}"),
            Phase::Lost => f.write_str("lost"),
        }
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Phase::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown phase '{s}'")))
    }
}

/// Whether a job may move from `from` to `to`. Final states are left by nobody
/// (the stores enforce that too); failing or cancelling is legal from anywhere else.
pub fn legal(from: (JobState, Phase), to: (JobState, Phase)) -> bool {
    use JobState::*;
    use Phase::*;
    if from.0.is_final() {
        return false;
    }
    if matches!(to.0, Failed | Cancelled) {
        return true;
    }
    match (from, to) {
        ((Queued, _), (Running, Models)) => true,
        ((Running, Models), (Running, Identify)) => true,
        // identify already done in the job folder
        ((Running, Models), (Running, Finish)) => true,
        ((Running, Identify), (Running, Finish)) => true,
        ((Running, Finish), (AwaitingLabels, Finish)) => true,
        ((AwaitingLabels, Finish), (Running, Finish)) => true,
        ((Running, Finish), (Running, FineTune(0))) => true,
        ((Running, FineTune(r)), (Running, FineTune(s))) => s == r + 1,
        ((Running, FineTune(_)), (Running, Finish)) => true,
        ((Running, Finish), (Done, Finish)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_back_what_they_write() {
        for p in [
            Phase::Models,
            Phase::Identify,
            Phase::Finish,
            Phase::FineTune(0),
            Phase::FineTune(17),
            Phase::Lost,
        ] {
            assert_eq!(Phase::parse(&p.to_string()), Some(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), p);
        }
        for bad in [
            "",
            "finetune:",
            "finetune:x",
            "model",
            "finetune:-1",
            "finetune-part",
        ] {
            assert_eq!(Phase::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_stage_is_leased_in_its_phase() {
        for st in [Stage::Identify, Stage::Round(0), Stage::Round(7)] {
            assert_eq!(Stage::of(st.phase()), Some(st));
            assert!(st.phase().leasable());
        }
        for p in [Phase::Models, Phase::Finish, Phase::Lost] {
            assert_eq!(Stage::of(p), None, "{p}");
        }
        assert_eq!(Stage::Round(1).unit(3), "round 1 part 3");
        assert_eq!(Stage::Identify.unit(3), "shard 3");
    }

    #[test]
    fn the_legal_moves() {
        use JobState::*;
        use Phase::*;
        assert!(legal((Queued, Models), (Running, Models)));
        assert!(legal((Running, FineTune(2)), (Running, FineTune(3))));
        assert!(!legal((Running, FineTune(2)), (Running, FineTune(4))));
        assert!(
            !legal((Running, Identify), (Done, Finish)),
            "no skipping the finish"
        );
        assert!(!legal((AwaitingLabels, Finish), (Running, Identify)));
        assert!(legal((AwaitingLabels, Finish), (Cancelled, Finish)));
        for end in [Done, Failed, Cancelled] {
            assert!(!legal((end, Finish), (Running, Finish)), "{end:?} is final");
            assert!(!legal((end, Finish), (Failed, Finish)), "{end:?} is final");
        }
    }
}
