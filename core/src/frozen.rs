//! TorchScript modules frozen for inference (cxx/frozen.cpp does the libtorch calls).
//!
//! `torch.jit.freeze` turns a module's weights into constants and folds what that
//! allows (conv + batch norm, constant sub-expressions); `optimize_for_inference` then
//! fuses and, on the CPU, picks MKL-DNN layouts where they pay. It is what a user's own
//! tuned Python loop does to its modules, and tch does not expose it. A frozen module
//! cannot be trained: the classifier Defuse fine-tunes is always a separate, unfrozen
//! copy ([`crate::models::Classifier::load`]).
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::Error;

/// How TorchScript models are prepared for inference (`models.jit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Jit {
    /// Frozen and optimised for inference (the default).
    #[default]
    Optimize,
    /// Frozen only.
    Freeze,
    /// Run as loaded, for modules that freezing breaks (ones that change their own
    /// attributes in `forward`).
    AsLoaded,
}

impl Jit {
    pub fn is_default(&self) -> bool {
        *self == Jit::default()
    }

    fn level(self) -> c_int {
        match self {
            Jit::AsLoaded => 0,
            Jit::Freeze => 1,
            Jit::Optimize => 2,
        }
    }
}

extern "C" {
    fn defuse_frozen_load(
        path: *const c_char,
        device: c_int,
        level: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn defuse_frozen_forward(
        module: *mut c_void,
        input: *mut c_void,
        out: *mut *mut c_void,
        max_out: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn defuse_frozen_free(module: *mut c_void);
    fn defuse_autocast_set(device: c_int, dtype: c_int) -> c_int;
    fn defuse_free_message(s: *mut c_char);
}

/// Takes the C++ side's message (and frees it).
fn message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown libtorch error".into();
    }
    // SAFETY: the shim wrote a NUL-terminated malloc'd string, freed right after.
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { defuse_free_message(err) };
    s
}

/// A TorchScript module loaded for inference, frozen per [`Jit`].
pub struct FrozenModule {
    ptr: *mut c_void,
}

// SAFETY: a torch::jit::Module is used from one thread at a time here (&mut is not
// needed for forward, but Defuse never shares one module between threads at once:
// every worker thread loads its own models), like tch's own CModule, which is Send.
unsafe impl Send for FrozenModule {}

impl Drop for FrozenModule {
    fn drop(&mut self) {
        // SAFETY: ptr came from defuse_frozen_load and is freed once.
        unsafe { defuse_frozen_free(self.ptr) }
    }
}

impl FrozenModule {
    /// Loads `path` on `device` and prepares it per `jit`. The error is libtorch's
    /// useful line (cxx/frozen.cpp `summary`); the caller names the file.
    pub fn load(path: &Path, device: Device, jit: Jit) -> std::result::Result<Self, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "the path holds a NUL byte".to_string())?;
        let dev = match device {
            Device::Cpu => -1,
            Device::Cuda(k) => k as c_int,
            other => return Err(format!("device {other:?} is not supported for TorchScript")),
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C string, out-pointer for the message.
        let ptr = unsafe { defuse_frozen_load(c_path.as_ptr(), dev, jit.level(), &mut err) };
        if ptr.is_null() {
            return Err(message(err));
        }
        Ok(FrozenModule { ptr })
    }

    /// `forward(x)`: the module's tensor, or the tensors of its tuple (at most 4).
    pub fn forward(&self, x: &Tensor) -> std::result::Result<Vec<Tensor>, String> {
        let mut out = [std::ptr::null_mut::<c_void>(); 4];
        let mut err = std::ptr::null_mut();
        // SAFETY: x's handle is a live torch::Tensor*, read (not consumed) by the shim;
        // the outputs are fresh torch::Tensor* that tch's Tensor takes ownership of.
        let n = unsafe {
            defuse_frozen_forward(
                self.ptr,
                x.as_ptr() as *mut c_void,
                out.as_mut_ptr(),
                out.len() as c_int,
                &mut err,
            )
        };
        if n < 0 {
            return Err(message(err));
        }
        Ok(out[..n as usize]
            .iter()
            .map(|&p| unsafe { Tensor::from_ptr(p as *mut _) })
            .collect())
    }
}

impl FrozenModule {
    /// Traces `f` on `example` into a TorchScript graph and prepares that per `jit`, on
    /// `example`'s device: how Defuse's built-in models run for inference. What `f`
    /// reads besides its input (the weights) becomes constants of the graph, so those
    /// tensors must not require gradients (libtorch refuses them as constants); sizes
    /// `f` reads from its input are baked in as well, except that the graph takes any
    /// batch size as long as `f` never reads the first dimension. tch's tracer can only
    /// save the traced module to a file: it passes through a temporary one. The
    /// prepared graph must give what `f` gives on `example` (to 1e-3 of its scale), or
    /// this is an error.
    pub fn trace(
        example: &Tensor,
        jit: Jit,
        f: impl Fn(&Tensor) -> Tensor,
    ) -> std::result::Result<Self, String> {
        let m = Self::trace_unchecked(example, jit, &f)?;
        let (want, got) =
            tch::no_grad(|| (f(example), m.forward_one(example, "the traced output")));
        let got = got?;
        if got.size() != want.size() {
            return Err(format!(
                "the traced graph returns shape {:?}, the model {:?}",
                got.size(),
                want.size()
            ));
        }
        let scale = f64::try_from(want.abs().max()).map_err(|e| e.to_string())?;
        let diff = f64::try_from((&got - &want).abs().max()).map_err(|e| e.to_string())?;
        // NaN differences fail too
        if diff.is_nan() || diff > 1e-3 * (1.0 + scale) {
            return Err(format!(
                "the traced graph differs from the model by {diff:e} on a probe batch"
            ));
        }
        Ok(m)
    }

    fn trace_unchecked(
        example: &Tensor,
        jit: Jit,
        f: &impl Fn(&Tensor) -> Tensor,
    ) -> std::result::Result<Self, String> {
        let mut closure = |xs: &[Tensor]| vec![f(&xs[0])];
        let traced = tch::no_grad(|| {
            tch::CModule::create_by_tracing(
                "defuse_traced",
                "forward",
                &[example.shallow_clone()],
                &mut closure,
            )
        })
        .map_err(|e| format!("tracing failed: {e}"))?;
        let file = tempfile::Builder::new()
            .prefix("defuse-traced-")
            .suffix(".pt")
            .tempfile()
            .map_err(|e| format!("no temporary file for the traced module: {e}"))?;
        traced
            .save(file.path())
            .map_err(|e| format!("cannot save the traced module: {e}"))?;
        FrozenModule::load(file.path(), example.device(), jit)
    }

    /// `forward(x)` of a module that must return one tensor (`what` it is, for the
    /// error when it returns a tuple).
    pub fn forward_one(&self, x: &Tensor, what: &str) -> std::result::Result<Tensor, String> {
        let mut out = self.forward(x)?;
        match out.len() {
            1 => Ok(out.pop().expect("one")),
            n => Err(format!(
                "it returns {n} tensors, expected one tensor of {what}"
            )),
        }
    }
}

/// A fixed probe batch of `shape` in [0, 1] on `device` (`|sin|` of the element
/// index): an input to trace models on and check the traces with, the same on every
/// run and drawn from no random stream.
pub fn probe(shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::arange(n, (tch::Kind::Float, device))
        .sin()
        .abs()
        .view(shape)
}

/// The number format of identify's decoder and classifier (`identify.precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout (the default).
    #[default]
    Float32,
    /// libtorch's autocast to bfloat16 (GPUs; CPUs with AVX-512 BF16 or AMX).
    Bfloat16,
    /// libtorch's autocast to float16 (GPUs).
    Float16,
}

/// Runs `f` with libtorch's autocast set per `precision` for `device` on this thread
/// (matrix products and convolutions in the lower precision, reductions in float32),
/// and restores the previous setting after, also on a panic.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> T {
    let code = match precision {
        Precision::Float32 => return f(),
        Precision::Bfloat16 => 0,
        Precision::Float16 => 1,
    };
    let dev = match device {
        Device::Cuda(_) => 1,
        _ => 0,
    };
    struct Restore(c_int, c_int);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: plain thread-local libtorch state.
            unsafe { defuse_autocast_set(self.0, self.1) };
        }
    }
    // SAFETY: plain thread-local libtorch state.
    let before = unsafe { defuse_autocast_set(dev, code) };
    let _restore = Restore(dev, before);
    f()
}

/// The [`Jit`] level models are loaded with for a search in `precision`: `optimize`
/// bakes float32 layouts into the graph that autocast cannot lower (MKL-DNN weights on
/// the CPU, where libtorch then refuses bfloat16 inputs; fused cuDNN ops on a GPU), so
/// with a lower precision it runs as `freeze`.
pub fn jit_for(jit: Jit, precision: Precision) -> Jit {
    match (jit, precision) {
        (Jit::Optimize, Precision::Bfloat16 | Precision::Float16) => Jit::Freeze,
        _ => jit,
    }
}

/// The message for a module that does not load, naming the file.
pub fn load_error(path: &Path, e: &str) -> Error {
    Error::model(path, format!("not a loadable TorchScript module: {e}"))
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`, found like any library: the
/// binary's rpath, then `LD_LIBRARY_PATH`) into the process, once. Nothing in a tch
/// binary references it, so the linker leaves it out and CUDA stays unavailable;
/// loading it registers the CUDA backend with libtorch. A CPU machine never calls
/// this, so one binary serves both (`--features cuda` links it instead).
pub fn load_cuda_backend() -> std::result::Result<(), String> {
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            extern "C" {
                fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
                fn dlerror() -> *mut c_char;
            }
            const RTLD_NOW: c_int = 2;
            const RTLD_GLOBAL: c_int = 0x100;
            // SAFETY: a NUL-terminated name; dlerror's string is read before any
            // other dl call.
            unsafe {
                if !dlopen(c"libtorch_cuda.so".as_ptr(), RTLD_NOW | RTLD_GLOBAL).is_null() {
                    return Ok(());
                }
                let e = dlerror();
                Err(if e.is_null() {
                    "dlopen(libtorch_cuda.so) failed".into()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                })
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn autocast_lowers_matrix_products_and_restores_the_setting() {
        let a = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
        let inside = autocast(Device::Cpu, Precision::Bfloat16, || a.matmul(&a));
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), Kind::Float, "restored after");
        let nested = autocast(Device::Cpu, Precision::Bfloat16, || {
            autocast(Device::Cpu, Precision::Float32, || a.matmul(&a))
        });
        // float32 leaves the caller's setting alone
        assert_eq!(nested.kind(), Kind::BFloat16);
        let r = std::panic::catch_unwind(|| {
            autocast(Device::Cpu, Precision::Bfloat16, || panic!("inside"))
        });
        assert!(r.is_err());
        assert_eq!(a.matmul(&a).kind(), Kind::Float, "restored after a panic");
    }
}
