//! Upper bounds of a job config: nothing a job asks for is unbounded. The config
//! validators refuse a value above its bound (at submit, and in `defuse run`) with the
//! field and the bound; the coordinator refuses a plan of more than [`MAX_SHARDS`].
use crate::error::{Error, Result};

/// `identify.samples` (perturbations per image) and `identify.keep`.
pub const MAX_SAMPLES: usize = 100_000;
/// `identify.batch_size`, `identify.chunk`, `correct.batch_size`,
/// `correct.scenario_batch_size`: rows in memory at once.
pub const MAX_BATCH: usize = 65_536;
/// `identify.shard_size`: images per shard.
pub const MAX_SHARD_SIZE: usize = 10_000_000;
/// Shards of one job's identify step (the split's images over `identify.shard_size`).
pub const MAX_SHARDS: usize = 100_000;
/// `distill.max_components`.
pub const MAX_COMPONENTS: usize = 1_000;
/// `distill.max_iter`.
pub const MAX_ITER: usize = 100_000;
/// `correct.samples_per_scenario`.
pub const MAX_SAMPLES_PER_SCENARIO: usize = 100_000;
/// `correct.parts`: the merge holds every part's checkpoint at once.
pub const MAX_PARTS: usize = 256;
/// `correct.local_steps`.
pub const MAX_LOCAL_STEPS: usize = 1_000_000;
/// `correct.epochs`.
pub const MAX_EPOCHS: usize = 10_000;

/// A file a client uploads with a job (`defuse submit`): bytes.
pub const MAX_UPLOAD_BYTES: u64 = 16 << 30;

/// `field = v` is refused above `max`.
pub fn at_most(field: &str, v: usize, max: usize) -> Result<()> {
    if v > max {
        return Err(Error::invalid(
            field,
            format!("{v} is above the limit of {max}"),
        ));
    }
    Ok(())
}
