"""defuse.export on a torchvision classifier and a small VAE: the files it writes are
the files `defuse run` takes. Needs PyTorch and torchvision (skipped without them: the
test suite's Python has neither; bench/setup.sh installs PyTorch) and DEFUSE_BIN."""
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from defuse import export as dx  # noqa: E402

BIN = os.environ.get("DEFUSE_BIN", "")
DATA = Path(__file__).resolve().parents[2] / "data" / "mnist"


class TinyVae(torch.nn.Module):
    """encode(x) -> (mu, logvar), decode(z) -> logits, as many VAEs are written."""

    def __init__(self, latent=6):
        super().__init__()
        self.enc = torch.nn.Linear(28 * 28, 2 * latent)
        self.dec = torch.nn.Linear(latent, 28 * 28)
        self.latent = latent

    def encode(self, x):
        h = self.enc(torch.flatten(x, 1))
        return h[:, : self.latent], h[:, self.latent:]

    def decode(self, z):
        return self.dec(z).view(-1, 1, 28, 28)


def resnet_for_mnist():
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def test_contract_violations_are_refused_with_what_was_expected(tmp_path):
    enc, dec = dx.vae_parts(TinyVae())
    with pytest.raises(ValueError, match=r"images outside \[0, 1\]"):
        dx.export_models(tmp_path, image_shape=(1, 28, 28), encoder=enc, decoder=dec)

    class OneOutput(torch.nn.Module):
        def forward(self, x):
            return torch.flatten(x, 1)[:, :4]

    with pytest.raises(ValueError, match=r"tuple \(mu, logvar\)"):
        dx.export_models(tmp_path, image_shape=(1, 28, 28), encoder=OneOutput())
    with pytest.raises(ValueError, match="mean and std"):
        dx.export_models(tmp_path, image_shape=(1, 28, 28), classifier=resnet_for_mnist(), mean=[0.1])


@pytest.mark.skipif(not BIN, reason="DEFUSE_BIN names no defuse binary")
def test_a_torchvision_classifier_and_a_vae_export_to_files_defuse_runs(tmp_path):
    enc, dec = dx.vae_parts(TinyVae())
    files = dx.export_models(tmp_path / "models", image_shape=(1, 28, 28),
                             classifier=resnet_for_mnist(), encoder=enc, decoder=dec,
                             mean=[0.1307], std=[0.3081], decoder_output="logits")
    assert (files.num_classes, files.latent) == (10, 6)
    for p in (files.classifier, files.encoder, files.decoder):
        assert p.is_file() and p.stat().st_size > 0
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(f'''name = "export-check"
seed = 1
out = "{out.as_posix()}"
[data]
path = "{DATA.as_posix()}"
limit_train = 200
limit_test = 40
{files.toml()}
[identify]
search = "all"
samples = 8
keep = 2
shard_size = 20
[distill]
max_components = 5
[label]
mode = "manual"
''')
    r = subprocess.run([BIN, "run", str(job)], capture_output=True, text=True, timeout=600)
    # the models load (Defuse checks each with a dry batch), identify searches with
    # them, distill clusters; the run then waits for labels (exit 3)
    assert r.returncode == 3, r.stderr[-3000:]
    assert (out / "identify" / "failures.safetensors").is_file()
    assert (out / "distill" / "scenarios.json").is_file()
