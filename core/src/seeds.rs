//! The determinism rule in one place: every random draw is seeded from the job seed,
//! the step, and the index of what is drawn for (image, scenario, shard), never from
//! the worker, the attempt or the clock.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Step tags: a different stream per step for the same indices.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Step {
    Identify = 1,
    Subsample = 2,
    KMeans = 3,
    Scenario = 4,
    Correct = 5,
}

/// splitmix64 finaliser: a good 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for `(job seed, step, parts...)`.
pub fn seed_for(job_seed: u64, step: Step, parts: &[u64]) -> u64 {
    parts.iter().fold(
        mix(job_seed ^ mix(step as u64)),
        |acc, &p| mix(acc ^ mix(p)),
    )
}

/// A random generator for `(job seed, step, parts...)`.
pub fn rng_for(job_seed: u64, step: Step, parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed_for(job_seed, step, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_every_part() {
        let a = seed_for(1, Step::Identify, &[0, 5]);
        assert_eq!(a, seed_for(1, Step::Identify, &[0, 5]));
        assert_ne!(a, seed_for(2, Step::Identify, &[0, 5]));
        assert_ne!(a, seed_for(1, Step::Scenario, &[0, 5]));
        assert_ne!(a, seed_for(1, Step::Identify, &[0, 6]));
        assert_ne!(a, seed_for(1, Step::Identify, &[5, 0]));
    }
}
