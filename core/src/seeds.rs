//! The determinism rule in one place: every random draw is seeded from the job seed,
//! the step, and the index of what is drawn for (image, scenario, shard), never from
//! the worker, the attempt or the clock.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

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

/// Standard normal draws `[keys.len(), rows, cols]` made on `device` from a
/// counter-based generator: element `(i, r, c)` is a hash of `(keys[i], r * cols + c)`
/// alone (lowbias32 rounds over 32-bit words, then Box-Muller in float64), so the same
/// keys give the same numbers on the CPU and on any GPU (to the last bit of float32
/// but for the rare value where the devices' `log`/`cos` round differently), for any
/// batching of the keys, without a host-side stream to copy over.
///
/// The integer arithmetic never overflows: every word stays below 2^32 and products
/// are taken 16 bits of the multiplier at a time (below 2^49).
pub fn normal_by_counter(keys: &[u64], rows: i64, cols: i64, device: Device) -> Tensor {
    const MASK: i64 = 0xffff_ffff;
    let b = keys.len() as i64;
    let words = |f: fn(u64) -> u64| {
        let v: Vec<i64> = keys.iter().map(|&k| f(k) as i64).collect();
        Tensor::from_slice(&v).to_device(device).view([b, 1, 1])
    };
    let lo = words(|k| k & 0xffff_ffff);
    let hi = words(|k| k >> 32);
    // x * m mod 2^32, exactly, in int64 for x < 2^32
    let mul = |x: &Tensor, m: i64| -> Tensor {
        let (m_hi, m_lo) = (m >> 16, m & 0xffff);
        let a = x * m_lo;
        let c = ((x * m_hi).bitwise_and(0xffff)) * 65536;
        (a + c).bitwise_and(MASK)
    };
    // lowbias32 (Chris Wellons' integer hash), a full-avalanche 32-bit permutation
    let hash = |x: Tensor| -> Tensor {
        let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
        let x = mul(&x, 0x7feb_352d);
        let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
        let x = mul(&x, 0x846c_a68b);
        x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
    };
    let counter = Tensor::arange(rows * cols, (Kind::Int64, device)).view([1, rows, cols]);
    let draw = |stream: i64| -> Tensor {
        // counter (two words per element) -> key low word -> key high word
        let x = hash(&counter * 2 + stream);
        let x = hash(x.bitwise_xor_tensor(&lo));
        hash(hash(x.bitwise_xor_tensor(&hi)))
    };
    let scale = 1.0 / 4_294_967_296.0;
    // u1 in (0, 1], u2 in [0, 1)
    let u1 = (draw(0).to_kind(Kind::Double) + 1.0) * scale;
    let u2 = draw(1).to_kind(Kind::Double) * scale;
    ((u1.log() * -2.0).sqrt() * (u2 * std::f64::consts::TAU).cos()).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_normals_are_standard_normal_and_independent_of_batching() {
        let keys: Vec<u64> = (0..64u64)
            .map(|i| seed_for(9, Step::Identify, &[1, i]))
            .collect();
        let all = normal_by_counter(&keys, 50, 20, Device::Cpu);
        assert_eq!(all.size(), [64, 50, 20]);
        // the same key gives the same draws whatever else is in the batch
        let one = normal_by_counter(&keys[17..18], 50, 20, Device::Cpu);
        assert!(one.equal(&all.narrow(0, 17, 1)));
        let v = Vec::<f32>::try_from(all.flatten(0, -1)).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // 64,000 draws: the mean's standard error is 0.004, the variance's 0.0056
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        // tails and quantiles of N(0, 1)
        let frac = |f: &dyn Fn(f64) -> bool| v.iter().filter(|&&x| f(x as f64)).count() as f64 / n;
        assert!((frac(&|x| x < -1.0) - 0.1587).abs() < 0.006);
        assert!((frac(&|x| x > 1.96) - 0.025).abs() < 0.003);
        assert!((frac(&|x| x.abs() < 0.5) - 0.3829).abs() < 0.008);
        // neighbouring elements and neighbouring keys are uncorrelated
        let corr = |a: &Tensor, b: &Tensor| {
            let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
            let c = ((&a - a.mean(Kind::Double)) * (&b - b.mean(Kind::Double))).mean(Kind::Double);
            f64::try_from(c / (a.std(true) * b.std(true))).unwrap()
        };
        let flat = all.view([64, 1000]);
        let c1 = corr(&flat.narrow(1, 0, 999), &flat.narrow(1, 1, 999));
        let c2 = corr(&flat.narrow(0, 0, 63), &flat.narrow(0, 1, 63));
        assert!(c1.abs() < 0.02 && c2.abs() < 0.02, "{c1} {c2}");
        // different keys, different draws
        assert!(!all.get(0).equal(&all.get(1)));
    }

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
