//! `defuse-bench`: the measuring side of `bench/run.py`. Every subcommand prints one
//! JSON line. Nothing here is a test: the numbers are reported, never asserted.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use defuse_core::data::{DataSpec, SplitName};
use defuse_core::dpgmm::{DpGmm, DpGmmOptions};
use defuse_core::identify::{identify, IdentifyOptions, Perturbation, Precision};
use defuse_core::models::{load_vae, Classifier, CnnArch, Jit, Vae, VaeArch};
use defuse_proto::auth::{AuthChannel, Bearer};
use defuse_proto::job_service_client::JobServiceClient;
use defuse_proto::{CancelRequest, StatusRequest, SubmitRequest};
use defuse_testkit::{free_port, load, rss_kib, wait_port, Proc, Redis};
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Perturbations decoded and classified per second by `defuse_core::identify`.
    Identify(IdentifyRun),
    /// This CPU's float32 matmul rate through libtorch, FLOP/s (best of 256..1024).
    Matmul {
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// DP-GMM fit time and quality on X.npy (the data the scikit-learn reference fits).
    Dpgmm {
        #[arg(long)]
        x: PathBuf,
        #[arg(long)]
        k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Where to write the labels (JSON) for the agreement with scikit-learn.
        #[arg(long)]
        labels_out: PathBuf,
        /// Iterations at most (scikit-learn's default, 1000, fits to convergence; a
        /// fixed count times the same work on both sides where that takes hours).
        #[arg(long, default_value_t = 1000)]
        max_iter: usize,
    },
    /// Leases + completions per second through a coordinator process and Redis, with
    /// simulated workers (no compute).
    Coordinator {
        /// The defuse binary.
        #[arg(long)]
        defuse: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// TorchScript models for the job's models step (any that load).
        #[arg(long)]
        models: PathBuf,
        #[arg(long, default_value_t = 50)]
        workers: usize,
        #[arg(long, default_value_t = 10000)]
        shards: usize,
        #[arg(long)]
        work: PathBuf,
    },
    /// A WebDataset copy of MNIST with `n` test images (the test split repeated) and the
    /// first 4,000 training images, in shards of 1,000 samples.
    MakeWebdataset {
        #[arg(long)]
        mnist: PathBuf,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Reads a data set whole and writes its layout (what a job's plan carries), then
    /// prints the process's peak resident memory.
    DataLayout {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Reads test images `start..end` alone (what a worker reads for a shard) with the
    /// layout `DataLayout` wrote, `times` times; prints images/s and the peak
    /// resident memory.
    DataWindow {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        layout: PathBuf,
        #[arg(long)]
        start: usize,
        #[arg(long)]
        end: usize,
        #[arg(long, default_value_t = 5)]
        times: usize,
    },
    /// Identify through a coordinator and N worker processes on a WebDataset copy of
    /// MNIST (`make-webdataset`), read from its folder or from a bucket in s3s-fs:
    /// seconds from the first lease to the last shard done, images/s, and the peak
    /// resident memory of the coordinator and of each worker.
    DataSource {
        #[arg(long)]
        defuse: PathBuf,
        /// MNIST's IDX folder: small models are trained on it (once, in --work/models).
        #[arg(long)]
        mnist: PathBuf,
        /// The WebDataset folder (`make-webdataset`).
        #[arg(long)]
        webdataset: PathBuf,
        /// Read the data from a bucket (s3s-fs, started here) instead of the folder.
        #[arg(long)]
        bucket: bool,
        /// Images searched: the first `limit` test images.
        #[arg(long)]
        limit: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Perturbations per image.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        #[arg(long)]
        work: PathBuf,
    },
    /// The planted-bug benchmark: a copy of MNIST whose thin 1s (the third of the
    /// training 1s with the least ink; or `--slice bold-threes`, the third of the 3s
    /// with the most ink, labelled 8) are labelled 7 in the training split only; `defuse
    /// run` trains on it, searches, distills, labels with the automatic oracle and
    /// corrects. Prints whether a scenario of the class read as the planted label was
    /// found and labelled with the class, and the classifiers' accuracy on the real
    /// images of the slice in the test split (true labels) and on the rest, before and
    /// after correction.
    Planted {
        #[arg(long)]
        defuse: PathBuf,
        #[arg(long)]
        mnist: PathBuf,
        #[arg(long)]
        work: PathBuf,
        /// Test images searched (0 = all of the searched part).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long, default_value_t = 5)]
        classifier_epochs: usize,
        #[arg(long, default_value_t = 10)]
        vae_epochs: usize,
        /// Also correct with these lambdas (`defuse sweep`, reusing the run) and
        /// measure the slice and the rest for each, e.g. `2,5`.
        #[arg(long, value_delimiter = ',')]
        lambdas: Vec<f64>,
        /// Also correct with each of these settings (`defuse run --set KEY=VALUE`,
        /// reusing every step before correct; repeat the flag), e.g.
        /// `--variant correct.conflicting_labels=keep --variant correct.samples=failures`:
        /// for each, the slice and the rest, the real members and the unsearched test
        /// images. The default run also reports how many of the planted training labels
        /// the training members flagged (recall) and how many flagged ones were planted
        /// (precision).
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// The planted bug: `thin-ones` (1s labelled 7) or `bold-threes` (3s labelled 8).
        #[arg(long, default_value = "thin-ones")]
        slice: String,
    },
    /// The report's map of a finished run's failure codes: seconds for t-SNE, and how
    /// well it and the PCA projection keep the scenarios apart (the share of each
    /// code's 10 nearest neighbours on the map that the DP-GMM put in its component).
    Map {
        /// The run's output folder.
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Identify through a coordinator (Redis, file artifacts) with N worker processes:
    /// seconds from the first lease to the last shard done.
    Scaling {
        #[arg(long)]
        defuse: PathBuf,
        /// The job file (its identify step is timed; the job is cancelled after it).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        workers: usize,
        /// libtorch threads per worker process.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        work: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Identify(run) => bench_identify(run),
        Cmd::Matmul { threads } => bench_matmul(threads),
        Cmd::Map { run, threads } => bench_map(&run, threads),
        Cmd::Dpgmm {
            x,
            k,
            seed,
            threads,
            labels_out,
            max_iter,
        } => bench_dpgmm(&x, k, seed, threads, &labels_out, max_iter),
        Cmd::Coordinator {
            defuse,
            data,
            models,
            workers,
            shards,
            work,
        } => bench_coordinator(&defuse, &data, &models, workers, shards, &work),
        Cmd::Scaling {
            defuse,
            config,
            workers,
            threads,
            work,
        } => bench_scaling(&defuse, &config, workers, threads, &work),
        Cmd::DataSource {
            defuse,
            mnist,
            webdataset,
            bucket,
            limit,
            workers,
            samples,
            work,
        } => bench_data_source(
            &defuse,
            &mnist,
            &webdataset,
            bucket,
            limit,
            workers,
            samples,
            &work,
        ),
        Cmd::MakeWebdataset { mnist, n, out } => make_webdataset(&mnist, n, &out),
        Cmd::Planted {
            defuse,
            mnist,
            work,
            limit,
            classifier_epochs,
            vae_epochs,
            lambdas,
            variants,
            slice,
        } => bench_planted(
            &defuse,
            &mnist,
            &work,
            limit,
            (classifier_epochs, vae_epochs),
            &lambdas,
            &variants,
            defuse_core::planted::Slice::named(&slice)?,
        ),
        Cmd::DataLayout { data, out } => {
            let t = Instant::now();
            let ds = DataSpec::from_path(&data).load()?;
            let layout = ds.layout.clone().context("this format has no layout")?;
            std::fs::write(&out, serde_json::to_vec(&layout)?)?;
            println!(
                "{}",
                json!({"images": ds.train.len() + ds.test.len(), "seconds": t.elapsed().as_secs_f64(), "peak_rss_kib": peak_rss_kib()})
            );
            Ok(())
        }
        Cmd::DataWindow {
            data,
            layout,
            start,
            end,
            times,
        } => {
            let layout: defuse_core::data::DataLayout =
                serde_json::from_slice(&std::fs::read(&layout)?)?;
            let spec = DataSpec::from_path(&data);
            let t = Instant::now();
            for _ in 0..times {
                let w = spec.read_window(&layout, SplitName::Test, start..end)?;
                assert_eq!(w.test.len(), end - start);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({"images": end - start, "images_per_s": ((end - start) * times) as f64 / s, "peak_rss_kib": peak_rss_kib()})
            );
            Ok(())
        }
    }
}

/// A process's peak resident memory (`VmHWM`), KiB.
fn peak_rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn bench_data_source(
    defuse: &std::path::Path,
    mnist: &std::path::Path,
    webdataset: &std::path::Path,
    bucket: bool,
    limit: usize,
    workers: usize,
    samples: usize,
    work: &std::path::Path,
) -> Result<()> {
    let models = work.join("models");
    std::fs::create_dir_all(&models)?;
    let (clf, vae) = (
        models.join("clf.safetensors"),
        models.join("vae.safetensors"),
    );
    if !clf.exists() || !vae.exists() {
        defuse_testkit::train_small_mnist_models(defuse, mnist, &models);
    }
    let run = work.join("run");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run)?;
    let s3 = bucket.then(defuse_testkit::S3::start);
    let env: Vec<(&'static str, String)> = s3.as_ref().map(|s| s.env()).unwrap_or_default();
    let data = match &s3 {
        Some(_) => {
            for (k, v) in &env {
                std::env::set_var(k, v);
            }
            let files: Vec<PathBuf> = std::fs::read_dir(webdataset)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            rt()?.block_on(async {
                use defuse_core::artifacts::ArtifactStore;
                let store = defuse_core::artifacts::S3Store::from_env("defuse", "bench-data").await;
                for f in &files {
                    let name = f.file_name().unwrap_or_default().to_string_lossy();
                    store.put_file(&name, f).await?;
                }
                Ok::<_, anyhow::Error>(())
            })?;
            "s3://defuse/bench-data".to_string()
        }
        None => webdataset.display().to_string(),
    };
    let stack = start_stack_with(defuse, &run, 30_000, &env)?;
    let mut ws = Vec::new();
    for i in 0..workers {
        let mut cmd = Command::new(defuse);
        cmd.args(["worker", "--coordinator", &stack.url])
            .args(["--threads", "1"])
            .arg("--cache-dir")
            .arg(run.join(format!("worker-{i}")))
            .envs(env.iter().cloned())
            .env("RUST_LOG", "warn");
        ws.push(Proc::spawn(&format!("worker-{i}"), &mut cmd, &run));
    }
    let cfg = format!(
        r#"
name = "data-source"
seed = 1
[data]
path = "{data}"
format = "webdataset"
num_classes = 10
limit_train = 4000
[models]
classifier = "{clf}"
vae = "{vae}"
[identify]
samples = {samples}
keep = 1
shard_size = 1000
limit = {limit}
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
"#,
        clf = clf.display(),
        vae = vae.display()
    );
    rt()?.block_on(async {
        let mut c = jobs(&stack.url).await?;
        let submitted = Instant::now();
        let job = submit(&mut c, cfg).await?;
        let first = wait_identify(&mut c, &job, Duration::from_secs(3600)).await;
        let done = Instant::now();
        let worker_peak: Vec<u64> = ws.iter().map(|w| peak_rss_of(w.pid()) / 1024).collect();
        let coordinator_peak = peak_rss_of(stack.coordinator.pid()) / 1024;
        let _ = c.cancel(CancelRequest { job_id: job }).await;
        let first = match first {
            Ok(f) => f.unwrap_or(submitted),
            Err(e) => bail!("{e:#}\n{}", ws[0].tail(20)),
        };
        let secs = (done - first).as_secs_f64();
        println!(
            "{}",
            json!({"source": if bucket { "bucket (s3s-fs)" } else { "folder" },
                   "workers": workers, "searched": limit, "samples": samples,
                   "identify_seconds": secs, "images_per_s": limit as f64 / secs,
                   "submit_to_identify_done_seconds": (done - submitted).as_secs_f64(),
                   "worker_peak_rss_mib": worker_peak, "coordinator_peak_rss_mib": coordinator_peak})
        );
        Ok(())
    })
}

/// This process's peak resident memory (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn make_webdataset(mnist: &std::path::Path, n: usize, out: &std::path::Path) -> Result<()> {
    let ds = DataSpec::from_path(mnist).load()?;
    std::fs::create_dir_all(out)?;
    let write = |split: &defuse_core::data::Split, name: &str, n: usize| -> Result<()> {
        for (k, start) in (0..n).step_by(1000).enumerate() {
            let mut tar = tar::Builder::new(std::fs::File::create(
                out.join(format!("{name}-{k:06}.tar")),
            )?);
            for i in start..(start + 1000).min(n) {
                let j = i % split.len();
                let mut png = Vec::new();
                image::GrayImage::from_raw(28, 28, split.images[j * 784..(j + 1) * 784].to_vec())
                    .context("an MNIST image")?
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
                let cls = split.labels[j].to_string();
                for (ext, data) in [("png", png.as_slice()), ("cls", cls.as_bytes())] {
                    let mut h = tar::Header::new_ustar();
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    tar.append_data(&mut h, format!("{i:08}.{ext}"), data)?;
                }
            }
            tar.finish()?;
        }
        Ok(())
    };
    write(&ds.train, "train", 4000)?;
    write(&ds.test, "test", n)?;
    Ok(())
}

/// The settings of one identify throughput run.
#[derive(clap::Args)]
struct IdentifyRun {
    /// Folder with encoder.pt, decoder.pt, classifier.pt (TorchScript), or
    /// `builtin`: Defuse's own CNN and VAE of the same architecture (random weights).
    #[arg(long)]
    models: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Searches run side by side, each with threads/workers intra-op threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// How TorchScript models are run: optimize (Defuse's default; the built-in models are then traced into TorchScript), freeze, as-loaded (built-in models eager at these two).
    #[arg(long, default_value = "optimize")]
    jit: String,
    /// float32, bfloat16 or float16 (autocast of the decoder and classifier).
    #[arg(long, default_value = "float32")]
    precision: String,
    #[arg(long, default_value_t = 100)]
    q: usize,
    #[arg(long, default_value_t = 2000)]
    images: usize,
    #[arg(long, default_value_t = 400)]
    chunk: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

fn bench_identify(run: IdentifyRun) -> Result<()> {
    let IdentifyRun {
        models,
        data,
        threads,
        workers,
        jit,
        precision,
        q,
        images,
        chunk,
        batch,
    } = run;
    let jit: Jit = serde_json::from_value(json!(jit)).context("--jit")?;
    let precision: Precision = serde_json::from_value(json!(precision)).context("--precision")?;
    let (models, data) = (models.as_path(), data.as_path());
    let workers = workers.max(1);
    let per_worker = (threads / workers).max(1);
    let jit = defuse_core::frozen::jit_for(jit, precision);
    tch::set_num_threads(per_worker as i32);
    let mut spec = DataSpec::from_path(data);
    spec.limit_test = images;
    let ds = spec.load()?;
    let split = ds.split(SplitName::Test);
    let n = split.len();
    let o = IdentifyOptions {
        search: defuse_core::identify::Search::All, // the weights are random: search every image, as the authors did
        samples: q,
        keep: 5,
        perturbation: Perturbation::default(),
        batch_size: batch,
        chunk,
        precision,
        ..Default::default()
    };
    let shape = ds.image_shape();
    let load = || -> Result<(Classifier, Vae)> {
        if models == std::path::Path::new("builtin") {
            // one initialisation at a time: the seed is global to libtorch
            static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = INIT.lock().unwrap();
            tch::manual_seed(0);
            let clf = Classifier::new_builtin(
                CnnArch {
                    channels: 1,
                    height: 28,
                    width: 28,
                    num_classes: 10,
                    width_base: 32,
                },
                Device::Cpu,
            )?;
            let vae = Vae::new_builtin(
                VaeArch {
                    channels: 1,
                    height: 28,
                    width: 28,
                    latent: 10,
                    width_base: 32,
                    hidden: 256,
                    beta: 1.0,
                },
                Device::Cpu,
            )?;
            // prepared as a job prepares them (`--jit`)
            return Ok((clf.into_inference(jit), vae.into_inference(jit)));
        }
        let clf = Classifier::load_for_inference(
            &models.join("classifier.pt"),
            shape,
            ds.num_classes() as i64,
            Device::Cpu,
            jit,
        )?;
        let vae = load_vae(
            &models.join("encoder.pt"),
            Some(&models.join("decoder.pt")),
            shape,
            Device::Cpu,
            jit,
        )?;
        Ok((clf, vae))
    };
    // warm-up: TorchScript's profiling executor optimises on the first calls
    {
        let (clf, vae) = load()?;
        identify(
            split,
            SplitName::Test,
            0..64.min(n),
            &clf,
            &vae,
            &o,
            0,
            |_| true,
        )?;
    }
    let started = Instant::now();
    let found: usize = std::thread::scope(|s| -> Result<usize> {
        let hs: Vec<_> = (0..workers)
            .map(|w| {
                let (o, load) = (&o, &load);
                s.spawn(move || -> Result<usize> {
                    // libtorch's thread count is per OS thread: say it on this one
                    defuse_core::threads::enter(per_worker);
                    let (clf, vae) = load()?;
                    let r = n * w / workers..n * (w + 1) / workers;
                    let (f, _) = identify(split, SplitName::Test, r, &clf, &vae, o, 0, |_| true)?;
                    Ok(f.len())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("identify thread"))
            .sum()
    })?;
    let dt = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"impl": "defuse", "models": models.display().to_string(), "jit": jit, "precision": precision, "threads": threads, "workers": workers, "chunk": chunk,
               "batch": batch, "images": n, "q": q, "seconds": dt,
               "per_s": (n * q) as f64 / dt, "kept": found})
    );
    Ok(())
}

fn bench_matmul(threads: usize) -> Result<()> {
    tch::set_num_threads(threads as i32);
    let mut best = 0f64;
    for n in [256i64, 512, 1024] {
        let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            let _ = a.matmul(&b);
        }
        let flop = 2.0 * (n * n * n) as f64;
        let reps = ((2e10 / flop) as usize).max(3);
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b);
        }
        best = best.max(flop * reps as f64 / t.elapsed().as_secs_f64());
    }
    println!("{}", json!({"threads": threads, "flops_per_s": best}));
    Ok(())
}

fn bench_dpgmm(
    x: &std::path::Path,
    k: usize,
    seed: u64,
    threads: usize,
    labels_out: &std::path::Path,
    max_iter: usize,
) -> Result<()> {
    tch::set_num_threads(threads as i32);
    let x = Tensor::read_npy(x).with_context(|| format!("reading {}", x.display()))?;
    let o = DpGmmOptions {
        max_components: k,
        max_iter,
        ..Default::default()
    };
    let t = Instant::now();
    let m = DpGmm::fit(&x, &o, seed)?;
    let dt = t.elapsed().as_secs_f64();
    let labels = m.predict(&x)?;
    std::fs::write(labels_out, serde_json::to_string(&labels)?)?;
    println!(
        "{}",
        json!({"impl": "defuse", "n": x.size()[0], "d": x.size()[1], "k": k, "seconds": dt,
               "n_iter": m.n_iter, "converged": m.converged,
               "lower_bound": m.lower_bounds.last(),
               "mean_log_likelihood": m.score(&x)?,
               "components_over_1pct": m.weights.iter().filter(|&&w| w > 0.01).count()})
    );
    Ok(())
}

fn bench_map(run: &std::path::Path, threads: usize) -> Result<()> {
    use defuse_core::identify::Failures;
    use defuse_core::layout;
    use defuse_core::tsne::neighbours_agree;
    defuse_core::threads::set_central(threads);
    defuse_core::threads::enter_central();
    let (failures, _) = Failures::read(&run.join(layout::FAILURES))?;
    let component: Vec<i64> = layout::read_json(&run.join(layout::ASSIGNMENTS))?;
    let t = Instant::now();
    let map = defuse_core::pictures::map(&failures.codes)?;
    let seconds = t.elapsed().as_secs_f64();
    let label: Vec<i64> = map.rows.iter().map(|&r| component[r as usize]).collect();
    println!(
        "{}",
        json!({"codes": failures.len(), "mapped": map.rows.len(),
               "latent": failures.codes.size().get(1), "seconds": seconds,
               "perplexity": map.perplexity,
               "neighbours_in_component_tsne": neighbours_agree(&map.xy, &label),
               "neighbours_in_component_pca": neighbours_agree(&map.pca, &label)})
    );
    Ok(())
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A coordinator process on Redis with file artifacts, killed on drop.
struct Stack {
    _redis: Redis,
    coordinator: Proc,
    url: String,
}

fn start_stack(defuse: &std::path::Path, work: &std::path::Path, lease_ms: u64) -> Result<Stack> {
    start_stack_with(defuse, work, lease_ms, &[])
}

/// The same, the coordinator started with `env` (S3 settings).
fn start_stack_with(
    defuse: &std::path::Path,
    work: &std::path::Path,
    lease_ms: u64,
    env: &[(&'static str, String)],
) -> Result<Stack> {
    std::fs::create_dir_all(work)?;
    let redis = Redis::start(false);
    let port = free_port();
    let mut cmd = Command::new(defuse);
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis", &redis.url()])
        .arg("--artifacts")
        .arg(format!("file://{}", work.join("artifacts").display()))
        .arg("--work-dir")
        .arg(work.join("coordinator-work"))
        .args(["--lease-ms", &lease_ms.to_string()])
        // the bench's jobs read data and models wherever its arguments put them
        .args(["--allow-path", "/"])
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn");
    let coordinator = Proc::spawn("coordinator", &mut cmd, work);
    if !wait_port(port, Duration::from_secs(20)) {
        bail!("coordinator did not listen:\n{}", coordinator.tail(20));
    }
    Ok(Stack {
        _redis: redis,
        coordinator,
        url: format!("http://127.0.0.1:{port}"),
    })
}

async fn jobs(url: &str) -> Result<JobServiceClient<AuthChannel>> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    Ok(JobServiceClient::new(AuthChannel::new(
        ch,
        Bearer::new(None).map_err(anyhow::Error::msg)?,
    )))
}

async fn submit(c: &mut JobServiceClient<AuthChannel>, config_toml: String) -> Result<String> {
    Ok(c.submit(SubmitRequest {
        config_toml,
        ..Default::default()
    })
    .await?
    .into_inner()
    .job_id)
}

/// Waits until the job's identify step has all its shards done (or the job ended).
async fn wait_identify(
    c: &mut JobServiceClient<AuthChannel>,
    job: &str,
    timeout: Duration,
) -> Result<Option<Instant>> {
    let end = Instant::now() + timeout;
    let mut first_lease = None;
    while Instant::now() < end {
        let s = c
            .status(StatusRequest { job_id: job.into() })
            .await?
            .into_inner();
        if let Some(st) = s.steps.iter().find(|s| s.step == "identify") {
            if first_lease.is_none() && st.shards_leased + st.shards_done > 0 {
                first_lease = Some(Instant::now());
            }
            if st.shards_total > 0 && st.shards_done == st.shards_total {
                return Ok(first_lease);
            }
        }
        if s.state == "failed" || s.state == "cancelled" {
            bail!("job {job} {}: {}", s.state, s.error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("job {job}: identify not done after {timeout:?}")
}

fn bench_coordinator(
    defuse: &std::path::Path,
    data: &std::path::Path,
    models: &std::path::Path,
    workers: usize,
    shards: usize,
    work: &std::path::Path,
) -> Result<()> {
    let stack = start_stack(defuse, work, 60_000)?;
    let cfg = format!(
        r#"
name = "load"
[data]
path = "{data}"
limit_test = {shards}
[models]
classifier = "{m}/classifier.pt"
vae = "{m}/encoder.pt"
vae_decoder = "{m}/decoder.pt"
[identify]
search = "all"
shard_size = 1
"#,
        data = data.display(),
        m = models.display()
    );
    let pid = stack.coordinator.pid();
    rt()?.block_on(async {
        let mut c = jobs(&stack.url).await?;
        let rss_before = rss_kib(pid).unwrap_or(0);
        let job = submit(&mut c, cfg).await?;
        let r = load::simulate_workers(
            &stack.url,
            None,
            workers,
            shards as u64,
            Duration::from_secs(600),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let rss_after = rss_kib(pid).unwrap_or(0);
        let _ = c.cancel(CancelRequest { job_id: job }).await;
        let once = r.accepted.values().all(|&n| n == 1);
        println!(
            "{}",
            json!({"workers": workers, "shards": shards, "leases": r.leases,
                   "completions": r.completions, "stale": r.stale, "errors": r.errors,
                   "empty_polls": r.empty_polls, "seconds": r.seconds,
                   "ops_per_s": r.ops_per_s(),
                   "lease_p50_us": load::quantile(&r.lease_us, 0.5),
                   "lease_p99_us": load::quantile(&r.lease_us, 0.99),
                   "complete_p50_us": load::quantile(&r.complete_us, 0.5),
                   "complete_p99_us": load::quantile(&r.complete_us, 0.99),
                   "distinct_shards": r.accepted.len(), "each_accepted_once": once,
                   "coordinator_rss_kib_before": rss_before,
                   "coordinator_rss_kib_after": rss_after})
        );
        Ok(())
    })
}

fn bench_scaling(
    defuse: &std::path::Path,
    config: &std::path::Path,
    workers: usize,
    threads: usize,
    work: &std::path::Path,
) -> Result<()> {
    let _ = std::fs::remove_dir_all(work);
    let stack = start_stack(defuse, work, 30_000)?;
    let cfg =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut ws = Vec::new();
    for i in 0..workers {
        let mut cmd = Command::new(defuse);
        cmd.args(["worker", "--coordinator", &stack.url])
            .args(["--threads", &threads.to_string()])
            .arg("--cache-dir")
            .arg(work.join(format!("worker-{i}")))
            .env("RUST_LOG", "warn");
        ws.push(Proc::spawn(&format!("worker-{i}"), &mut cmd, work));
    }
    rt()?.block_on(async {
        let mut c = jobs(&stack.url).await?;
        let submitted = Instant::now();
        let job = submit(&mut c, cfg).await?;
        let first = wait_identify(&mut c, &job, Duration::from_secs(3600)).await;
        let done = Instant::now();
        let _ = c.cancel(CancelRequest { job_id: job }).await;
        let first = match first {
            Ok(f) => f.unwrap_or(submitted),
            Err(e) => bail!("{e:#}\n{}", ws[0].tail(20)),
        };
        println!(
            "{}",
            json!({"workers": workers, "threads": threads,
                   "identify_seconds": (done - first).as_secs_f64(),
                   "submit_to_identify_done_seconds": (done - submitted).as_secs_f64()})
        );
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn bench_planted(
    defuse: &std::path::Path,
    mnist: &std::path::Path,
    work: &std::path::Path,
    limit: usize,
    (classifier_epochs, vae_epochs): (usize, usize),
    lambdas: &[f64],
    variants: &[String],
    slice: defuse_core::planted::Slice,
) -> Result<()> {
    use defuse_core::planted::{searched_range, slice_accuracy, write_planted_mnist};
    let ds = DataSpec::from_path(mnist).load()?;
    let planted = write_planted_mnist(mnist, &work.join("data"), slice)?;
    let job = work.join("planted.toml");
    std::fs::write(
        &job,
        defuse_core::planted::job_toml(classifier_epochs, vae_epochs, limit),
    )?;
    let t = Instant::now();
    let status = Command::new(defuse).arg("run").arg(&job).status()?;
    if !status.success() {
        bail!("defuse run {} failed: {status}", job.display());
    }
    let run = work.join("run");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report/summary.json"))?)?;
    // "found": a labelled scenario whose failures are read as the planted label and
    // which the oracle labelled with the slice's true class
    let found_in = |summary: &serde_json::Value| -> Result<Vec<u64>> {
        Ok(summary["scenarios"]
            .as_array()
            .context("summary.json: scenarios")?
            .iter()
            .filter(|s| s["label"] == json!(slice.class) && s["predicted"] == json!(slice.as_label))
            .filter_map(|s| s["id"].as_u64())
            .collect())
    };
    let found = found_in(&summary)?;
    let tuned = PathBuf::from(summary["model"].as_str().context("summary.json: model")?);
    let tuned = if tuned.is_absolute() {
        tuned
    } else {
        work.join(tuned)
    };
    // the slice and the rest over the whole test split and over the unsearched images
    let searched = searched_range(limit, ds.test.len());
    let accuracy = |path: &std::path::Path| -> Result<serde_json::Value> {
        let a = slice_accuracy(path, &ds.test, &planted, searched.clone())?;
        Ok(json!({
            "slice": a.all.slice,
            "rest": a.all.rest,
            "slice_unsearched": a.unsearched.slice,
            "rest_unsearched": a.unsearched.rest,
            "slice_images": a.all.slice_images,
            "rest_images": a.all.rest_images,
            "slice_images_unsearched": a.unsearched.slice_images,
            "rest_images_unsearched": a.unsearched.rest_images,
        }))
    };
    let before = accuracy(&run.join("models/classifier.safetensors"))?;
    let after = accuracy(&tuned)?;
    let mut sweep = Vec::new();
    if !lambdas.is_empty() {
        let list: Vec<String> = lambdas.iter().map(|l| l.to_string()).collect();
        let status = Command::new(defuse)
            .args([
                "sweep",
                &job.to_string_lossy(),
                "--lambdas",
                &list.join(","),
            ])
            .status()?;
        if !status.success() {
            bail!("defuse sweep {} failed: {status}", job.display());
        }
        for l in lambdas {
            let a = accuracy(
                &run.join(format!("sweep/lambda-{l}"))
                    .join(tuned.file_name().context("the tuned model's file name")?),
            )?;
            sweep.push(json!({"lambda": l, "accuracy": a}));
        }
    }
    // the training members the default run flagged, against the planted labels
    let planted_rows = planted.rows(&ds.train);
    let flagged = |run: &std::path::Path| -> Result<serde_json::Value> {
        let members: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(
            run.join(defuse_core::layout::TRAIN_MEMBERS),
        )?)?;
        let conflicting: Vec<usize> = members
            .iter()
            .filter(|m| !m["scenario_label"].is_null() && m["scenario_label"] != m["label"])
            .filter_map(|m| m["row"].as_u64().map(|r| r as usize))
            .collect();
        let hits = conflicting.iter().filter(|&&r| planted_rows[r]).count();
        Ok(json!({
            "train_members": members.len(),
            "conflicting": conflicting.len(),
            "conflicting_planted": hits,
            "recall": hits as f64 / planted.train_relabelled.max(1) as f64,
            "precision": hits as f64 / conflicting.len().max(1) as f64,
        }))
    };
    let flagged_default = flagged(&run)?;
    // the default run's summary, kept for bench/yield.py (the runs below overwrite it)
    std::fs::copy(
        run.join("report/summary.json"),
        work.join("summary-default.json"),
    )?;
    let mut corrected = Vec::new();
    for set in variants {
        let status = Command::new(defuse)
            .arg("run")
            .arg(&job)
            .args(["--set", set])
            .status()?;
        if !status.success() {
            bail!("defuse run {} --set {set} failed: {status}", job.display());
        }
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("report/summary.json"))?)?;
        corrected.push(json!({
            "set": set,
            "accuracy": accuracy(&tuned)?,
            "test_unsearched": s["test_unsearched"],
            "real_members_labelled": s["real_members_labelled"],
            "train_members_labelled": s["train_members_labelled"],
            "flagged": flagged(&run)?,
            "found_scenarios": found_in(&s)?,
            "n_scenarios": s["n_scenarios"],
            "n_labelled": s["n_labelled"],
        }));
    }
    println!(
        "{}",
        json!({
            "slice": slice.name,
            "ink_threshold": planted.ink_threshold,
            "train_relabelled": planted.train_relabelled,
            "searched": [searched.start, searched.end],
            "found_scenarios": found,
            "before": before,
            "after": after,
            "real_members_labelled": summary["real_members_labelled"],
            "test_unsearched": summary["test_unsearched"],
            "n_scenarios": summary["n_scenarios"],
            "n_labelled": summary["n_labelled"],
            "train_members_labelled": summary["train_members_labelled"],
            "flagged": flagged_default,
            "seconds": t.elapsed().as_secs_f64(),
            "sweep": sweep,
            "variants": corrected,
        })
    );
    Ok(())
}
