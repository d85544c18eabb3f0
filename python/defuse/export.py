"""Export PyTorch models to the TorchScript files a Defuse job takes (`[models]`).

    import defuse.export as dx
    files = dx.export_models("models/", classifier=net, encoder=enc, decoder=dec,
                             image_shape=(3, 32, 32), mean=[.5, .5, .5], std=[.5, .5, .5])
    print(files.toml())     # the [models] section of a job file

Defuse's contract (README, "Bring your own models"): images are float32 NCHW in [0, 1];
the classifier returns logits `[N, classes]`; the VAE is two files, an encoder returning
`(mu, logvar)`, each `[N, latent]`, and a decoder from `[N, latent]` to images in
[0, 1]. A model trained on normalised inputs (torchvision's `Normalize`) gets the
normalisation inside the exported file (`mean`/`std`), and a decoder that outputs
logits or normalised images gets `decoder_output="logits"` or `"normalized"`.

Each module is traced in eval mode, reloaded from its file and checked against the
eager module on a batch of the given shape (shapes, finite values, outputs equal to
1e-4) before its path is returned: a file that Defuse would refuse is refused here,
with what was expected. Needs PyTorch (any recent version writes files libtorch 2.11
reads); the rest of the package does not import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]


@dataclass
class ExportedModels:
    """The files written, and what Defuse needs to know of them."""

    classifier: Optional[Path]
    encoder: Optional[Path]
    decoder: Optional[Path]
    num_classes: Optional[int]
    latent: Optional[int]

    def toml(self) -> str:
        """The `[models]` section of a job file naming these files."""
        lines = ["[models]"]
        for key, path in (("classifier", self.classifier), ("vae", self.encoder),
                          ("vae_decoder", self.decoder)):
            if path is not None:
                lines.append(f'{key} = "{path.resolve().as_posix()}"')
        return "\n".join(lines) + "\n"


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("defuse.export needs PyTorch: pip install torch") from e
    return torch


def _channel_buffers(torch, module, mean, std):
    """Registers per-channel `mean` and `std` buffers `[1, C, 1, 1]` on `module`."""
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def _normalizing(torch, module, mean, std):
    """`module` behind `(x - mean) / std`, so that it takes images in [0, 1]."""
    if mean is None and std is None:
        return module
    if mean is None or std is None:
        raise ValueError("give both mean and std (the normalisation the model was trained with), or neither")

    class Normalized(torch.nn.Module):
        def __init__(self, inner, mean, std):
            super().__init__()
            self.inner = inner
            _channel_buffers(torch, self, mean, std)

        def forward(self, x):
            return self.inner((x - self.mean) / self.std)

    return Normalized(module, mean, std)


def _decoder_to_unit(torch, decoder, output, mean, std):
    """A decoder whose images are in [0, 1], whatever it was trained to output."""
    if output == "unit":
        return decoder
    if output not in ("logits", "normalized"):
        raise ValueError(f"decoder_output must be 'unit', 'logits' or 'normalized', got {output!r}")
    if output == "normalized" and (mean is None or std is None):
        raise ValueError("decoder_output='normalized' needs mean and std")

    class ToUnit(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            if output == "normalized":
                _channel_buffers(torch, self, mean, std)

        def forward(self, z):
            y = self.inner(z)
            if output == "logits":
                return torch.sigmoid(y)
            return (y * self.std + self.mean).clamp(0.0, 1.0)

    return ToUnit(decoder)


def _trace_check_save(torch, module, example, path: Path, check):
    module = module.eval()
    with torch.no_grad():
        eager = module(example)
        traced = torch.jit.trace(module, example, check_trace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
        again = loaded(example)
    check(eager, again, path)
    return path, eager


def _close(a, b) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * (1 + a.abs().max()))


def export_models(
    directory: PathLike,
    *,
    image_shape: Sequence[int],
    classifier=None,
    encoder=None,
    decoder=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    decoder_output: str = "unit",
    batch: int = 4,
) -> ExportedModels:
    """Writes `classifier.pt`, `encoder.pt` and `decoder.pt` (those given) to
    `directory`.

    `image_shape` is `(C, H, W)` of the data set Defuse will read. `mean`/`std` are the
    per-channel normalisation the classifier and encoder were trained with (put inside
    the files: Defuse feeds images in [0, 1]). `encoder` must return `(mu, logvar)`; a
    torchvision-style VAE whose `encode` returns them can be passed as
    `encoder=vae.encode`-wrapping module, see `vae_parts`.
    """
    torch = _torch()
    out = Path(directory)
    c, h, w = (int(v) for v in image_shape)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((batch, c, h, w), generator=gen)
    num_classes = latent = None
    paths = {"classifier": None, "encoder": None, "decoder": None}

    if classifier is not None:
        def check_classifier(eager, again, path):
            if not (isinstance(eager, torch.Tensor) and eager.dim() == 2 and eager.shape[0] == batch):
                raise ValueError(f"classifier: expected logits [N, classes] for input [N, {c}, {h}, {w}], "
                                 f"got {getattr(eager, 'shape', type(eager))}")
            if not torch.isfinite(eager).all():
                raise ValueError("classifier: non-finite logits on images in [0, 1]")
            if not _close(eager, again):
                raise ValueError(f"classifier: {path} does not reproduce the module (tracing lost a branch?)")

        m = _normalizing(torch, classifier, mean, std)
        paths["classifier"], logits = _trace_check_save(torch, m, images, out / "classifier.pt",
                                                        check_classifier)
        num_classes = int(logits.shape[1])

    if encoder is not None:
        def check_encoder(eager, again, path):
            ok = isinstance(eager, (tuple, list)) and len(eager) == 2 and all(
                isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == batch for t in eager)
            if not ok or eager[0].shape != eager[1].shape:
                raise ValueError("encoder: expected a tuple (mu, logvar), each [N, latent], "
                                 f"got {type(eager).__name__}")
            if not all(_close(a, b) for a, b in zip(eager, again)):
                raise ValueError(f"encoder: {path} does not reproduce the module")

        m = _normalizing(torch, encoder, mean, std)
        paths["encoder"], (mu, _) = _trace_check_save(torch, m, images, out / "encoder.pt", check_encoder)
        latent = int(mu.shape[1])

    if decoder is not None:
        if latent is None:
            raise ValueError("export the decoder with its encoder (its input size is the encoder's latent)")
        codes = torch.randn((batch, latent), generator=gen)

        def check_decoder(eager, again, path):
            if not (isinstance(eager, torch.Tensor) and tuple(eager.shape) == (batch, c, h, w)):
                raise ValueError(f"decoder: expected images [N, {c}, {h}, {w}] from codes [N, {latent}], "
                                 f"got {getattr(eager, 'shape', type(eager))}")
            if eager.min() < -1e-6 or eager.max() > 1 + 1e-6:
                raise ValueError("decoder: images outside [0, 1]; pass decoder_output='logits' or "
                                 "'normalized' (with mean and std)")
            if not _close(eager, again):
                raise ValueError(f"decoder: {path} does not reproduce the module")

        m = _decoder_to_unit(torch, decoder, decoder_output, mean, std)
        paths["decoder"], _ = _trace_check_save(torch, m, codes, out / "decoder.pt", check_decoder)

    return ExportedModels(paths["classifier"], paths["encoder"], paths["decoder"], num_classes, latent)


def vae_parts(vae, encode: str = "encode", decode: str = "decode") -> Tuple[object, object]:
    """Splits a VAE module with `encode(x) -> (mu, logvar)` and `decode(z)` methods into
    the two modules `export_models` takes."""
    torch = _torch()

    class Encoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            mu, logvar = getattr(self.vae, encode)(x)
            return mu, logvar

    class Decoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return getattr(self.vae, decode)(z)

    return Encoder(vae), Decoder(vae)
