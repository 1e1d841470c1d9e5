"""Does the slimlm target's proxy price GPTQ and EoRA options right? For q_proj and down_proj of the built-in model,
each option's KL measured directly by the probe (2 x 256 c4 tokens, seed 0; GPTQ/EoRA fitted on 16 x 512, seed 1)
beside two proxies: the search's (the KL of the option's family reference measured, carried to the option by its
output error: sensitivity.item_costs) and the former rule (RTN w4g64's KL carried to every option). Rows marked
"reference" are measured by the search itself (proxy = direct); the others test the carrying.
Written to results/auto_proxy_check.json.

    python benchmarks/auto_proxy_check.py [--work /tmp/slimlm-auto-slimlm/shared]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import RESULTS
from slimlm.auto.probe import Probe
from slimlm.auto.run import AutoSettings, _target, sensitivity_costs
from slimlm.data import calibration_windows, load_text
from slimlm.models import load_model
from slimlm.pipeline import write_json_atomic

OPTIONS = (
    "w4g64",
    "w3g64",
    "gptq-w4g64",
    "gptq-w3g64",
    "gptq-w2g64",
    "gptq-w3g64+eora16",
    "gptq-w3g32+eora16",
    "gptq-w2g64+eora16",
    "w3g64+eora16",
    "w2g64+eora16",
)


def _error(probe: Probe, option) -> float:
    return sum(probe.output_error(name, weight) for name, weight in option.weights().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="q_proj,down_proj")
    parser.add_argument("--work", default="/tmp/slimlm-auto-slimlm/shared")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    output = tempfile.mkdtemp(prefix="slimlm-proxy-check-")
    settings = AutoSettings(model="smollm2-135m", budget="1GB", target="slimlm", output=output, work=args.work)
    costs, _ = sensitivity_costs(settings, loaded, _target(settings, loaded, Path(output)))
    windows = calibration_windows(loaded.tokenizer, load_text("c4"), settings.calib_samples, settings.calib_seq_len, 0)
    probe = Probe(loaded.model, windows)
    found = {}
    for item, item_costs in zip(costs.items, costs.costs, strict=True):
        if item.name in args.items.split(","):
            names = [o.name for o in item.options]
            rtn = item.options[names.index("w4g64")]
            rtn_kl, rtn_error = probe.kl(rtn.weights()), _error(probe, rtn)
            for name in OPTIONS:
                option, proxy = item.options[names.index(name)], item_costs[names.index(name)]
                found[f"{item.name} {name}"] = {
                    "role": "reference" if names.index(name) in item.references else "carried",
                    "proxy": proxy,
                    "former_proxy": rtn_kl * _error(probe, option) / rtn_error,
                    "direct_kl": probe.kl(option.weights()),
                }
                print(item.name, name, found[f"{item.name} {name}"], flush=True)
    write_json_atomic(RESULTS / "auto_proxy_check.json", {"rows": found, "protocol": __doc__.split("\n\n")[0]})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
