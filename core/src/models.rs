//! The two models Defuse works with: the classifier under test and the VAE.
//!
//! Each comes in one of two formats:
//! - **built-in** (trained by `defuse train`): a single `.safetensors` file whose
//!   metadata names the architecture (`defuse.kind`, `defuse.arch`);
//! - **TorchScript** (`.pt`, brought by the user): the classifier takes float32 NCHW in
//!   [0,1] and returns logits; the VAE is two files, an encoder returning
//!   `(mu, logvar)` and a decoder returning images in [0,1].
//!
//! Whatever the format, a model is checked on load with a dry forward on a batch of
//! the dataset's shape, and a classifier can be fine-tuned and saved back in the format
//! it came in.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::frozen::FrozenModule;
pub use crate::frozen::Jit;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                Error::invalid("device", format!("'{s}': expected cpu, cuda or cuda:N"))
            }),
    }
    .and_then(|d| {
        if let Device::Cuda(n) = d {
            let loaded = crate::frozen::load_cuda_backend();
            let have = tch::Cuda::device_count() as usize;
            if n >= have {
                let why = match loaded {
                    Err(e) => format!("; libtorch's CUDA backend did not load: {e}"),
                    Ok(()) => String::new(),
                };
                return Err(Error::invalid(
                    "device",
                    format!(
                        "'{s}': this machine has {have} CUDA device(s) visible to libtorch{why}"
                    ),
                ));
            }
        }
        Ok(d)
    })
}

/// Architecture of the built-in CNN classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnArch {
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    pub num_classes: i64,
    /// Width of the first convolution (the second has twice as many).
    pub width_base: i64,
}

/// Architecture of the built-in VAE.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VaeArch {
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    pub latent: i64,
    pub width_base: i64,
    pub hidden: i64,
    /// Weight of the KL term (beta-VAE); 1 is the plain VAE.
    pub beta: f64,
}

/// Two conv + max-pool blocks, then two linear layers with dropout.
#[derive(Debug)]
struct Cnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Cnn {
    fn new(p: &nn::Path, a: &CnnArch) -> Self {
        let c = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let w = a.width_base;
        let flat = 2 * w * (a.height / 4) * (a.width / 4);
        Cnn {
            conv1: nn::conv2d(p / "conv1", a.channels, w, 3, c),
            conv2: nn::conv2d(p / "conv2", w, 2 * w, 3, c),
            fc1: nn::linear(p / "fc1", flat, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, a.num_classes, Default::default()),
        }
    }
}

/// How [`relu_pool2`] pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// `max_pool2d`: training (its gradient goes to one input of each window), and the
    /// traced graph, where `optimize_for_inference` runs it as an MKL-DNN pooling on
    /// the convolution's own layout.
    MaxPool2d,
    /// The maximum of four strided views: eager inference.
    StridedMax,
}

/// `relu` then 2x2 max pooling. Eager inference computes it as the maximum of four
/// strided views, then `relu` (the two commute): the same numbers, about 7x faster on
/// CPU than eager `max_pool2d`, which computes and discards the arg-max indices (30% of
/// the classifier's time in the identify profile, bench/README.md).
fn relu_pool2(x: Tensor, pool: Pool) -> Tensor {
    if pool == Pool::MaxPool2d {
        return x.relu().max_pool2d_default(2);
    }
    let (h, w) = (x.size()[2] / 2 * 2, x.size()[3] / 2 * 2);
    let q = |i: i64, j: i64| x.slice(2, i, h, 2).slice(3, j, w, 2);
    q(0, 0)
        .maximum(&q(0, 1))
        .maximum(&q(1, 0).maximum(&q(1, 1)))
        .relu()
}

impl Cnn {
    fn forward_pooled(&self, xs: &Tensor, train: bool, pool: Pool) -> Tensor {
        let x = relu_pool2(xs.apply(&self.conv1), pool);
        relu_pool2(x.apply(&self.conv2), pool)
            .flatten(1, -1)
            .dropout(0.25, train)
            .apply(&self.fc1)
            .relu()
            .dropout(0.5, train)
            .apply(&self.fc2)
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let pool = if train {
            Pool::MaxPool2d
        } else {
            Pool::StridedMax
        };
        self.forward_pooled(xs, train, pool)
    }
}

/// Convolutional VAE: two stride-2 convolutions down, two transposed ones up.
#[derive(Debug)]
struct ConvVae {
    arch: VaeArch,
    e1: nn::Conv2D,
    e2: nn::Conv2D,
    e3: nn::Linear,
    mu: nn::Linear,
    logvar: nn::Linear,
    d1: nn::Linear,
    d2: nn::Linear,
    d3: nn::ConvTranspose2D,
    d4: nn::ConvTranspose2D,
}

impl ConvVae {
    fn new(p: &nn::Path, a: &VaeArch) -> Self {
        let c = nn::ConvConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let t = nn::ConvTransposeConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let w = a.width_base;
        let flat = 2 * w * (a.height / 4) * (a.width / 4);
        ConvVae {
            arch: *a,
            e1: nn::conv2d(p / "enc1", a.channels, w, 4, c),
            e2: nn::conv2d(p / "enc2", w, 2 * w, 4, c),
            e3: nn::linear(p / "enc3", flat, a.hidden, Default::default()),
            mu: nn::linear(p / "mu", a.hidden, a.latent, Default::default()),
            logvar: nn::linear(p / "logvar", a.hidden, a.latent, Default::default()),
            d1: nn::linear(p / "dec1", a.latent, a.hidden, Default::default()),
            d2: nn::linear(p / "dec2", a.hidden, flat, Default::default()),
            d3: nn::conv_transpose2d(p / "dec3", 2 * w, w, 4, t),
            d4: nn::conv_transpose2d(p / "dec4", w, a.channels, 4, t),
        }
    }

    fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        let h = x
            .apply(&self.e1)
            .relu()
            .apply(&self.e2)
            .relu()
            .flatten(1, -1)
            .apply(&self.e3)
            .relu();
        (h.apply(&self.mu), h.apply(&self.logvar))
    }

    fn decode(&self, z: &Tensor) -> Tensor {
        let a = &self.arch;
        z.apply(&self.d1)
            .relu()
            .apply(&self.d2)
            .relu()
            .view([-1, 2 * a.width_base, a.height / 4, a.width / 4])
            .apply(&self.d3)
            .relu()
            .apply(&self.d4)
            .sigmoid()
    }
}

/// The classifier under test.
pub struct Classifier {
    vs: nn::VarStore,
    net: ClassifierNet,
    num_classes: i64,
}

enum ClassifierNet {
    BuiltIn(CnnArch, Box<Cnn>),
    /// A built-in CNN for inference only ([`Classifier::into_inference`]): its eval
    /// forward traced into TorchScript and prepared like a user's file; the var store
    /// keeps the weights it is saved from.
    BuiltInTraced(CnnArch, FrozenModule),
    /// TorchScript, trainable (the copy Defuse fine-tunes).
    Script(tch::TrainableCModule),
    /// TorchScript prepared for inference only ([`Classifier::load_for_inference`]),
    /// with the file it came from (saving it copies that file).
    Inference(FrozenModule, PathBuf),
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.net {
            ClassifierNet::BuiltIn(a, _) => format!("built-in cnn {a:?}"),
            ClassifierNet::BuiltInTraced(a, ..) => {
                format!("built-in cnn {a:?}, traced for inference")
            }
            ClassifierNet::Script(_) => "torchscript".to_string(),
            ClassifierNet::Inference(..) => "torchscript, for inference".to_string(),
        };
        write!(f, "Classifier({kind}, {} classes)", self.num_classes)
    }
}

impl Classifier {
    /// A freshly initialised built-in CNN.
    pub fn new_builtin(arch: CnnArch, device: Device) -> Result<Self> {
        check_builtin_size("classifier", arch.height, arch.width)?;
        let vs = nn::VarStore::new(device);
        let net = Cnn::new(&vs.root(), &arch);
        Ok(Classifier {
            vs,
            net: ClassifierNet::BuiltIn(arch, Box::new(net)),
            num_classes: arch.num_classes,
        })
    }

    /// Loads a classifier (built-in `.safetensors` or TorchScript `.pt`) and checks it
    /// on a dry batch of shape `[2, C, H, W]` against `num_classes`.
    pub fn load(
        path: &Path,
        image_shape: [i64; 3],
        num_classes: i64,
        device: Device,
    ) -> Result<Self> {
        let this = if is_safetensors(path) {
            let meta = read_meta(path)?;
            let arch: CnnArch = parse_arch(path, &meta, "cnn")?;
            let mut c = Classifier::new_builtin(arch, device)?;
            c.vs.load(path).map_err(|e| {
                Error::model(path, format!("weights do not fit the architecture: {e}"))
            })?;
            c
        } else {
            let vs = nn::VarStore::new(device);
            let mut m = tch::TrainableCModule::load(path, vs.root())
                .map_err(|e| crate::frozen::load_error(path, &first_line(&e)))?;
            m.set_eval();
            Classifier {
                vs,
                net: ClassifierNet::Script(m),
                num_classes,
            }
        };
        this.check(path, image_shape, num_classes)?;
        Ok(this)
    }

    /// Loads a classifier to run, never to train, prepared per `jit` (frozen and
    /// optimised for inference by default, as a tuned Python loop would): a TorchScript
    /// file directly, a built-in one through [`Classifier::into_inference`].
    pub fn load_for_inference(
        path: &Path,
        image_shape: [i64; 3],
        num_classes: i64,
        device: Device,
        jit: Jit,
    ) -> Result<Self> {
        if is_safetensors(path) {
            return Ok(
                Classifier::load(path, image_shape, num_classes, device)?.into_inference(jit)
            );
        }
        let m = FrozenModule::load(path, device, jit)
            .map_err(|e| crate::frozen::load_error(path, &e))?;
        let this = Classifier {
            vs: nn::VarStore::new(device),
            net: ClassifierNet::Inference(m, path.to_path_buf()),
            num_classes,
        };
        this.check(path, image_shape, num_classes)?;
        Ok(this)
    }

    /// This classifier for inference only. A built-in one at `jit = optimize` (the
    /// default) has its eval forward traced into a TorchScript graph, frozen and
    /// optimised for inference: the frozen path a user's own files take, 1.4x the eager
    /// net on this CPU (bench/README.md, "Built-in models through the frozen path").
    /// At `freeze` or `as-loaded` it stays eager: freezing alone has nothing to fold in
    /// it (no batch norm), and a lower `identify.precision` runs models at `freeze`
    /// ([`crate::frozen::jit_for`]), where the eager net under autocast is the faster.
    /// Should tracing fail, or the traced graph disagree with the net on a probe batch,
    /// it stays eager with a warning: the same results, only slower. Anything else is
    /// returned as it is. A traced classifier cannot be trained.
    pub fn into_inference(self, jit: Jit) -> Self {
        let Classifier {
            mut vs,
            net,
            num_classes,
        } = self;
        let net = match net {
            ClassifierNet::BuiltIn(arch, cnn) if jit == Jit::Optimize => {
                // the weights become constants of the graph: no gradients
                vs.freeze();
                let probe =
                    crate::frozen::probe(&[2, arch.channels, arch.height, arch.width], vs.device());
                match FrozenModule::trace(&probe, jit, |x| {
                    cnn.forward_pooled(x, false, Pool::MaxPool2d)
                }) {
                    Ok(m) => ClassifierNet::BuiltInTraced(arch, m),
                    Err(e) => {
                        not_traced("classifier", &e);
                        vs.unfreeze();
                        ClassifierNet::BuiltIn(arch, cnn)
                    }
                }
            }
            net => net,
        };
        Classifier {
            vs,
            net,
            num_classes,
        }
    }

    /// An error unless this classifier can be trained (not loaded for inference).
    pub fn trainable(&self) -> Result<()> {
        if let ClassifierNet::Inference(..) | ClassifierNet::BuiltInTraced(..) = self.net {
            return Err(Error::invalid(
                "classifier",
                "this copy was loaded for inference (frozen) and cannot be trained; load it with Classifier::load",
            ));
        }
        Ok(())
    }

    fn check(&self, path: &Path, [c, h, w]: [i64; 3], num_classes: i64) -> Result<()> {
        if let ClassifierNet::BuiltIn(a, _) | ClassifierNet::BuiltInTraced(a, ..) = &self.net {
            builtin_shape_matches(
                path,
                "classifier",
                [a.channels, a.height, a.width],
                [c, h, w],
            )?;
        }
        let x = Tensor::rand([2, c, h, w], (Kind::Float, self.vs.device()));
        let out = tch::no_grad(|| self.try_forward(&x, false)).map_err(|e| {
            Error::model(
                path,
                format!(
                    "the classifier fails on a [2, {c}, {h}, {w}] batch (float32 NCHW in [0,1], this dataset's shape): {}",
                    first_line(&e)
                ),
            )
        })?;
        if out.size() != [2, num_classes] {
            let got = out.size();
            let msg = if got.len() == 2 && got[0] == 2 {
                format!("the classifier returns {} logits per image but the dataset has {num_classes} classes", got[1])
            } else {
                format!("the classifier returns shape {got:?} for a batch of 2, expected [2, {num_classes}] logits")
            };
            return Err(Error::model(path, msg));
        }
        if !bool::try_from(out.isfinite().all()).unwrap_or(false) {
            return Err(Error::model(
                path,
                "the classifier returns NaN or infinite logits on a dry batch",
            ));
        }
        Ok(())
    }

    fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor, String> {
        match &self.net {
            ClassifierNet::BuiltIn(_, n) => Ok(n.forward_t(x, train)),
            ClassifierNet::BuiltInTraced(..) if train => {
                Err("this built-in classifier was traced for inference and cannot train".into())
            }
            ClassifierNet::BuiltInTraced(_, m) => m.forward_one(x, "logits"),
            ClassifierNet::Script(m) => m.forward_ts(&[x]).map_err(|e| e.to_string()),
            ClassifierNet::Inference(m, _) => m.forward_one(x, "logits"),
        }
    }

    /// Logits for a batch of images (float32 NCHW in [0,1]). `train` turns dropout on
    /// for built-in models; TorchScript models follow `set_train`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.try_forward(x, train).map_err(torch_error)
    }

    pub fn set_train(&mut self, train: bool) {
        if let ClassifierNet::Script(m) = &mut self.net {
            if train {
                m.set_train()
            } else {
                m.set_eval()
            }
        }
    }

    /// The weights. Of a built-in classifier traced for inference, the weights it was
    /// traced from: writing them does not change the traced graph (it cannot train).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn is_torchscript(&self) -> bool {
        matches!(
            self.net,
            ClassifierNet::Script(_) | ClassifierNet::Inference(..)
        )
    }

    /// The file extension of this classifier's format (`safetensors` or `pt`).
    pub fn extension(&self) -> &'static str {
        if self.is_torchscript() {
            "pt"
        } else {
            "safetensors"
        }
    }

    /// Saves in the format the model came in.
    pub fn save(&self, path: &Path) -> Result<()> {
        match &self.net {
            ClassifierNet::BuiltIn(arch, _) | ClassifierNet::BuiltInTraced(arch, ..) => {
                write_builtin(path, &self.vs, "cnn", arch)
            }
            ClassifierNet::Script(m) => m
                .save(path)
                .map_err(|e| Error::model(path, format!("cannot save: {e}"))),
            // the frozen graph is not the user's module: save the file it came from
            ClassifierNet::Inference(_, source) => {
                if source != path {
                    std::fs::copy(source, path).map_err(|e| Error::io(path, e))?;
                }
                Ok(())
            }
        }
    }

    /// Predicted class and its softmax probability, in batches, without gradients.
    pub fn predict(&self, x: &Tensor, batch: i64) -> Result<(Tensor, Tensor)> {
        tch::no_grad(|| {
            let n = x.size()[0];
            let mut preds = Vec::new();
            let mut confs = Vec::new();
            for start in (0..n).step_by(batch.max(1) as usize) {
                let len = batch.min(n - start);
                let logits = finite_logits(self.forward(&x.narrow(0, start, len), false)?, || {
                    "images".into()
                })?;
                let p = logits.softmax(-1, Kind::Float);
                let (conf, pred) = p.max_dim(1, false);
                preds.push(pred);
                confs.push(conf);
            }
            Ok((Tensor::cat(&preds, 0), Tensor::cat(&confs, 0)))
        })
    }
}

/// The logits, or an error when any is NaN or infinite: argmax over NaN would turn
/// a broken model into made-up failures (or made-up accuracy).
/// `what` names the rows for the message; it is only built when there is an error.
pub fn finite_logits(logits: Tensor, what: impl FnOnce() -> String) -> Result<Tensor> {
    let bad = i64::try_from(
        logits
            .isfinite()
            .logical_not()
            .any_dim(1, false)
            .sum(Kind::Int64),
    )?;
    if bad > 0 {
        return Err(Error::invalid(
            "classifier",
            format!(
                "it returned NaN or infinite logits for {bad} of {} {}; check the model (and its input scaling)",
                logits.size()[0],
                what()
            ),
        ));
    }
    Ok(logits)
}

/// The VAE whose latent space Defuse searches.
pub struct Vae {
    net: VaeNet,
    latent: i64,
    device: Device,
}

enum VaeNet {
    BuiltIn(Box<(nn::VarStore, ConvVae)>),
    /// A built-in VAE for inference only ([`Vae::into_inference`]): the encoder (its
    /// `mu` and `logvar` side by side in one tensor) and the decoder traced into
    /// TorchScript and prepared like a user's files; the eager net keeps the weights.
    BuiltInTraced {
        builtin: Box<(nn::VarStore, ConvVae)>,
        encoder: FrozenModule,
        decoder: FrozenModule,
    },
    Script {
        encoder: FrozenModule,
        decoder: FrozenModule,
    },
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.net {
            VaeNet::BuiltIn(_) => "built-in",
            VaeNet::BuiltInTraced { .. } => "built-in, traced for inference",
            VaeNet::Script { .. } => "torchscript",
        };
        write!(f, "Vae({kind}, latent {})", self.latent)
    }
}

impl Vae {
    pub fn new_builtin(arch: VaeArch, device: Device) -> Result<Self> {
        check_builtin_size("vae", arch.height, arch.width)?;
        let vs = nn::VarStore::new(device);
        let net = ConvVae::new(&vs.root(), &arch);
        Ok(Vae {
            net: VaeNet::BuiltIn(Box::new((vs, net))),
            latent: arch.latent,
            device,
        })
    }

    /// Loads a built-in VAE (`.safetensors`).
    pub fn load_builtin(path: &Path, image_shape: [i64; 3], device: Device) -> Result<Self> {
        let meta = read_meta(path)?;
        let arch: VaeArch = parse_arch(path, &meta, "vae")?;
        let mut v = Vae::new_builtin(arch, device)?;
        if let VaeNet::BuiltIn(b) = &mut v.net {
            let vs = &mut b.0;
            vs.load(path).map_err(|e| {
                Error::model(path, format!("weights do not fit the architecture: {e}"))
            })?;
        }
        v.check(path, path, image_shape)?;
        Ok(v)
    }

    /// This VAE for inference only: a built-in one at `jit = optimize` has its encoder
    /// and decoder traced, frozen and optimised as [`Classifier::into_inference`] does
    /// (and stays eager, with a warning, where that fails); anything else is returned
    /// as it is. A traced VAE cannot be trained.
    pub fn into_inference(self, jit: Jit) -> Self {
        let Vae {
            net,
            latent,
            device,
        } = self;
        let net = match net {
            VaeNet::BuiltIn(mut builtin) if jit == Jit::Optimize => {
                builtin.0.freeze();
                let (a, vae) = (builtin.1.arch, &builtin.1);
                let images = crate::frozen::probe(&[2, a.channels, a.height, a.width], device);
                let codes = crate::frozen::probe(&[2, a.latent], device) * 2.0 - 1.0;
                let traced = FrozenModule::trace(&images, jit, |x| {
                    let (mu, logvar) = vae.encode(x);
                    Tensor::cat(&[mu, logvar], 1)
                })
                .and_then(|encoder| {
                    let decoder = FrozenModule::trace(&codes, jit, |z| vae.decode(z))?;
                    Ok((encoder, decoder))
                });
                match traced {
                    Ok((encoder, decoder)) => VaeNet::BuiltInTraced {
                        builtin,
                        encoder,
                        decoder,
                    },
                    Err(e) => {
                        not_traced("VAE", &e);
                        builtin.0.unfreeze();
                        VaeNet::BuiltIn(builtin)
                    }
                }
            }
            net => net,
        };
        Vae {
            net,
            latent,
            device,
        }
    }

    /// Loads a TorchScript VAE given as an encoder and a decoder file, prepared for
    /// inference per `jit` (a TorchScript VAE is never trained here).
    pub fn load_torchscript(
        encoder: &Path,
        decoder: &Path,
        image_shape: [i64; 3],
        device: Device,
        jit: Jit,
    ) -> Result<Self> {
        let load = |p: &Path| {
            FrozenModule::load(p, device, jit).map_err(|e| crate::frozen::load_error(p, &e))
        };
        let (enc, dec) = (load(encoder)?, load(decoder)?);
        let mut v = Vae {
            net: VaeNet::Script {
                encoder: enc,
                decoder: dec,
            },
            latent: 0,
            device,
        };
        v.check(encoder, decoder, image_shape)?;
        Ok(v)
    }

    /// Dry run: the encoder must give `(mu, logvar)` of one latent size, the decoder
    /// must give back images of the dataset's shape.
    fn check(&mut self, enc_path: &Path, dec_path: &Path, [c, h, w]: [i64; 3]) -> Result<()> {
        if let VaeNet::BuiltIn(b) | VaeNet::BuiltInTraced { builtin: b, .. } = &self.net {
            let a = b.1.arch;
            builtin_shape_matches(enc_path, "VAE", [a.channels, a.height, a.width], [c, h, w])?;
        }
        let x = Tensor::rand([2, c, h, w], (Kind::Float, self.device));
        let (mu, logvar) = tch::no_grad(|| self.try_encode(&x)).map_err(|e| {
            Error::model(
                enc_path,
                format!(
                    "the encoder fails on a [2, {c}, {h}, {w}] batch (this dataset's shape): {}",
                    first_line(&e)
                ),
            )
        })?;
        let ms = mu.size();
        if ms.len() != 2 || ms[0] != 2 || logvar.size() != ms {
            return Err(Error::model(
                enc_path,
                format!(
                    "the encoder must return (mu, logvar), each [batch, latent]; got shapes {ms:?} and {:?}",
                    logvar.size()
                ),
            ));
        }
        self.latent = ms[1];
        let out = tch::no_grad(|| self.try_decode(&mu)).map_err(|e| {
            Error::model(
                dec_path,
                format!(
                    "the decoder fails on a [2, {}] batch of codes: {}",
                    ms[1],
                    first_line(&e)
                ),
            )
        })?;
        if out.size() != [2, c, h, w] {
            return Err(Error::model(
                dec_path,
                format!(
                    "the decoder returns shape {:?} for 2 codes, expected [2, {c}, {h}, {w}]",
                    out.size()
                ),
            ));
        }
        let finite = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
        if !finite(&mu) || !finite(&logvar) || !finite(&out) {
            return Err(Error::model(
                enc_path,
                "the VAE returns NaN or infinite values on a dry batch",
            ));
        }
        Ok(())
    }

    fn try_encode(&self, x: &Tensor) -> Result<(Tensor, Tensor), String> {
        match &self.net {
            VaeNet::BuiltIn(b) => Ok(b.1.encode(x)),
            VaeNet::BuiltInTraced { encoder, .. } => {
                let both = encoder.forward_one(x, "codes")?;
                let l = both.size()[1] / 2;
                Ok((both.narrow(1, 0, l), both.narrow(1, l, l)))
            }
            VaeNet::Script { encoder, .. } => {
                let mut out = encoder.forward(x)?;
                match out.len() {
                    2 => {
                        let logvar = out.pop().expect("two");
                        Ok((out.pop().expect("two"), logvar))
                    }
                    1 => Err(
                        "encoder returns one tensor; it must return a tuple (mu, logvar)".into(),
                    ),
                    n => Err(format!(
                        "encoder returns {n} tensors; it must return a tuple (mu, logvar)"
                    )),
                }
            }
        }
    }

    fn try_decode(&self, z: &Tensor) -> Result<Tensor, String> {
        match &self.net {
            VaeNet::BuiltIn(b) => Ok(b.1.decode(z)),
            VaeNet::BuiltInTraced { decoder, .. } => decoder.forward_one(z, "images"),
            VaeNet::Script { decoder, .. } => decoder
                .forward_one(z, "images")
                .map_err(|e| format!("decoder: {e}")),
        }
    }

    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.try_encode(x).map_err(torch_error)
    }

    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.try_decode(z).map_err(torch_error)
    }

    pub fn latent(&self) -> i64 {
        self.latent
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The trainable variables (built-in only, and not traced for inference).
    pub fn var_store(&self) -> Option<&nn::VarStore> {
        match &self.net {
            VaeNet::BuiltIn(b) => Some(&b.0),
            VaeNet::BuiltInTraced { .. } | VaeNet::Script { .. } => None,
        }
    }

    pub fn beta(&self) -> f64 {
        match &self.net {
            VaeNet::BuiltIn(b) | VaeNet::BuiltInTraced { builtin: b, .. } => b.1.arch.beta,
            VaeNet::Script { .. } => 1.0,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        match &self.net {
            VaeNet::BuiltIn(b) | VaeNet::BuiltInTraced { builtin: b, .. } => {
                write_builtin(path, &b.0, "vae", &b.1.arch)
            }
            VaeNet::Script { .. } => Err(Error::model(
                path,
                "a TorchScript VAE is used as given; it is not saved again",
            )),
        }
    }
}

/// Per-image VAE loss terms, averaged over the batch: Bernoulli reconstruction
/// (binary cross-entropy summed over pixels) and the Gaussian KL divergence
/// `KL(N(mu, exp(logvar)) || N(0, I))`.
pub fn vae_loss_terms(
    x: &Tensor,
    recon: &Tensor,
    mu: &Tensor,
    logvar: &Tensor,
) -> (Tensor, Tensor) {
    let n = x.size()[0] as f64;
    let rec = recon.binary_cross_entropy::<Tensor>(x, None, tch::Reduction::Sum) / n;
    let kl = (logvar.exp() + mu.square() - 1.0 - logvar).sum(Kind::Float) * 0.5 / n;
    (rec, kl)
}

/// One VAE forward with the reparameterisation trick (training).
pub fn vae_forward_train(vae: &Vae, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (mu, logvar) = vae.encode(x)?;
    let z = &mu + (&logvar * 0.5).exp() * mu.randn_like();
    Ok((vae.decode(&z)?, mu, logvar))
}

/// Built-in layers panic inside tch on a wrong shape, so compare before any forward.
fn builtin_shape_matches(path: &Path, what: &str, arch: [i64; 3], data: [i64; 3]) -> Result<()> {
    if arch != data {
        return Err(Error::model(
            path,
            format!("this built-in {what} takes {arch:?} (C, H, W) images but the dataset's are {data:?}"),
        ));
    }
    Ok(())
}

fn check_builtin_size(what: &str, h: i64, w: i64) -> Result<()> {
    if h < 4 || w < 4 || h % 4 != 0 || w % 4 != 0 {
        return Err(Error::invalid(
            what,
            format!("the built-in {what} needs image sides divisible by 4 (28, 32, 64...), this data is {h}x{w}; bring a TorchScript model for other sizes"),
        ));
    }
    Ok(())
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("safetensors")
}

/// The warning of a built-in model that stays eager because it could not be traced.
fn not_traced(what: &str, e: &str) {
    tracing::warn!(
        error = e,
        "the built-in {what} runs eagerly (slower, the same results): it could not be traced for inference; models.jit = \"as-loaded\" skips the attempt"
    );
}

/// A failure inside a model's forward, as libtorch reported it.
fn torch_error(msg: String) -> Error {
    Error::Torch(tch::TchError::Torch(msg))
}

fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn read_meta(path: &Path) -> Result<HashMap<String, String>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = crate::tensor_io::read_header(&mut f)
        .map_err(|msg| Error::model(path, format!("not a safetensors file: {msg}")))?;
    Ok(meta.unwrap_or_default())
}

fn parse_arch<T: serde::de::DeserializeOwned>(
    path: &Path,
    meta: &HashMap<String, String>,
    kind: &str,
) -> Result<T> {
    match meta.get("defuse.kind") {
        Some(k) if k == kind => {}
        Some(k) => {
            return Err(Error::model(
                path,
                format!("this is a built-in '{k}' model, expected a '{kind}'"),
            ));
        }
        None => {
            return Err(Error::model(
                path,
                "safetensors file without 'defuse.kind' metadata: not a Defuse built-in model (bring TorchScript .pt files for your own models)",
            ));
        }
    }
    let arch = meta
        .get("defuse.arch")
        .ok_or_else(|| Error::model(path, "metadata 'defuse.arch' is missing"))?;
    serde_json::from_str(arch)
        .map_err(|e| Error::model(path, format!("metadata 'defuse.arch' is invalid: {e}")))
}

fn write_builtin<A: Serialize>(path: &Path, vs: &nn::VarStore, kind: &str, arch: &A) -> Result<()> {
    let meta = HashMap::from([
        ("defuse.kind".to_string(), kind.to_string()),
        (
            "defuse.arch".to_string(),
            serde_json::to_string(arch).expect("arch serialises"),
        ),
    ]);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    crate::tensor_io::write(path, &vars, meta)
}

/// Where a job's models come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelFiles {
    /// Classifier: built-in `.safetensors` or TorchScript `.pt`.
    #[serde(default)]
    pub classifier: Option<PathBuf>,
    /// VAE: built-in `.safetensors`, or a TorchScript encoder (with `vae_decoder`).
    #[serde(default)]
    pub vae: Option<PathBuf>,
    /// TorchScript decoder, when `vae` is a TorchScript encoder.
    #[serde(default)]
    pub vae_decoder: Option<PathBuf>,
    /// How models are run for search and evaluation: `optimize` (frozen and optimised
    /// for inference, the default; the built-in models are traced into TorchScript
    /// first), `freeze`, or `as-loaded` (the built-in models run eagerly at these two).
    /// The copy that is fine-tuned is never frozen.
    /// Left out of the serialised form at its default, so that the models step's hash
    /// of a job is what it was before the field existed.
    #[serde(default, skip_serializing_if = "Jit::is_default")]
    pub jit: Jit,
}

/// Loads a VAE given either as one built-in file or as a TorchScript encoder/decoder pair.
pub fn load_vae(
    vae: &Path,
    decoder: Option<&Path>,
    image_shape: [i64; 3],
    device: Device,
    jit: Jit,
) -> Result<Vae> {
    match decoder {
        Some(dec) => Vae::load_torchscript(vae, dec, image_shape, device, jit),
        None if is_safetensors(vae) => {
            Ok(Vae::load_builtin(vae, image_shape, device)?.into_inference(jit))
        }
        None => Err(Error::model(
            vae,
            "a TorchScript VAE needs its decoder too (`vae_decoder` in the job's [models] table); only built-in VAEs are one .safetensors file",
        )),
    }
}

#[cfg(test)]
mod pool_tests {
    use super::{relu_pool2, Pool};
    use tch::{Device, Kind, Tensor};

    #[test]
    fn fast_pooling_equals_max_pool2d() {
        tch::manual_seed(3);
        for (h, w) in [(28, 28), (14, 14), (7, 9), (32, 31)] {
            let x = Tensor::randn([5, 3, h, w], (Kind::Float, Device::Cpu));
            let slow = relu_pool2(x.shallow_clone(), Pool::MaxPool2d);
            let fast = relu_pool2(x, Pool::StridedMax);
            assert_eq!(slow.size(), fast.size(), "{h}x{w}");
            assert!(slow.equal(&fast), "{h}x{w}: values differ");
        }
    }
}
