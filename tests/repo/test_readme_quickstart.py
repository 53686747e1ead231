"""The README's API quickstart runs as written (ViT-B/16 at 224, two images, reference path)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_api_quickstart_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## API quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope = {"__name__": "readme_quickstart"}
    exec(compile(code, "README quickstart", "exec"), scope)
    out = scope["out"]
    assert set(out) == {"loss", "feature", "relation"}
    assert all(v.dim() == 0 for v in out.values())
    assert scope["t"].relation.shape == (2, 16, 12, 196) and scope["t"].topk_idx.shape == (2, 15)
    assert scope["model"].patch_embed.proj.weight.grad is not None
