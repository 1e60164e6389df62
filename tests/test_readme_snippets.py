"""The README's Python snippets run as written (with tiny stand-ins for the user's objects)."""
import re

import torch
from conftest import ROOT
from test_sara import tiny_pipeline


def snippet(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_diffusers_sara_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe, other = tiny_pipeline(tmp_path / "a"), tiny_pipeline(tmp_path / "b")
    original = {k: v.clone() for k, v in other.unet.state_dict().items()}

    class StableDiffusionPipeline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return other

    code = snippet("### Diffusers\n").split("# python scripts/")[0]
    namespace = {"pipe": pipe, "noise_loss": torch.zeros(()), "StableDiffusionPipeline": StableDiffusionPipeline}
    exec(compile(code, "README.md (Diffusers)", "exec"), namespace)
    assert (tmp_path / "runs" / "sara" / "adapter.safetensors").is_file()
    assert all(torch.equal(v, original[k]) for k, v in other.unet.state_dict().items())  # loaded, then unloaded exactly
    assert not hasattr(other.unet, "petl")
