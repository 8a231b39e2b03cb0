"""torch.hub entry points for the published networks (no network access needed: the weights are in the clone).

    model = torch.hub.load("path/to/skipnet", "skipnet38_cifar10", source="local")

One entry per name of ``skipnet.list_pretrained()``; ``pretrained=False`` gives the same network with fresh
weights. Works from a clone with or without ``pip install``.
"""

import sys
from pathlib import Path

dependencies = ["torch", "yaml", "numpy"]

try:
    import skipnet
except ImportError:  # a plain clone: use its source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import skipnet


def _entry(name):
    def load(pretrained=True, map_location="cpu"):
        if pretrained:
            return skipnet.pretrained(name, map_location=map_location)
        from skipnet.models import SkipNetConfig, SkipResNet

        return SkipResNet(SkipNetConfig(**skipnet.published.stored_config(name))).eval()

    load.__name__ = name
    info = skipnet.pretrained_info(name)
    load.__doc__ = (f"{info.get('title', name)}: top-1 {info.get('accuracy')} % on {info.get('data')}, "
                    f"{info.get('mac_reduction')} % fewer MACs than its plain network.")
    return load


for _name in skipnet.list_pretrained():
    globals()[_name] = _entry(_name)
