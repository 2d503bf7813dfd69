"""Section 5.1 at initialization: ESS / TSS against TSS for the S6, GLA and GLA-S6 featurizations
(GLA and GLA-S6 also with a normalizer of 1), before and after ``ess_init(scheme="auto")``.

    python benchmarks/exp_init_tss.py     # table on stdout, plot in docs/figures/init_tss.png
"""

from __future__ import annotations

import torch

from ess_reg import capture_operators
from ess_reg.functional import ess_summary
from ess_reg.models import SequenceModel
from init_schemes import ess_init

STATES = (4, 8, 16, 32, 64)
KINDS = ("s6", "gla", "gla (normalizer 1)", "gla_s6", "gla_s6 (normalizer 1)")


def utilization(model: SequenceModel, probe: torch.Tensor) -> tuple[float, float]:
    """Mean ESS / TSS and mean ESS over the layers, on the probe."""
    with torch.no_grad():
        ops = capture_operators(model, probe)
    summaries = [ess_summary(op, splits=16) for op in ops.values()]
    return (sum(float(s["utilization"]) for s in summaries) / len(summaries),
            sum(float(s["ess"]) for s in summaries) / len(summaries))


def build(kind: str, state: int) -> SequenceModel:
    torch.manual_seed(0)
    if kind == "s6":
        return SequenceModel("s6", d_model=64, n_layers=2, vocab_size=256, d_state=state)
    if kind.startswith("gla_s6"):
        normalizer = 1.0 if "normalizer 1" in kind else 16.0
        return SequenceModel("gla_s6", d_model=64, n_layers=2, vocab_size=256, d_state=state,
                             gate_logit_normalizer=normalizer)
    normalizer = {"gla": 16.0, "gla (normalizer 1)": 1.0}[kind]
    return SequenceModel("gla", d_model=64, n_layers=2, vocab_size=256, num_heads=2,
                         expand_k=2 * state / 64, gate_logit_normalizer=normalizer)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(1))
    print("| featurization | TSS per channel | ESS/TSS default init | ESS default | "
          "ESS/TSS after ess_init(auto) | ESS after |")
    print("|---|---|---|---|---|---|")
    fig, (left, ax) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        before, after, ess_before, ess_after = [], [], [], []
        for state in STATES:
            model = build(kind, state)
            u0, e0 = utilization(model, probe)
            ess_init(model, probe=probe, verbose=False)
            u1, e1 = utilization(model, probe)
            before.append(u0)
            after.append(u1)
            ess_before.append(e0)
            ess_after.append(e1)
            print(f"| {kind} | {state} | {u0:.3f} | {e0:.2f} | {u1:.3f} | {e1:.2f} |", flush=True)
        for panel, (b, a) in ((left, (ess_before, ess_after)), (ax, (before, after))):
            line = panel.plot(STATES, b, marker="o", label=f"{kind}: default init")
            panel.plot(STATES, a, marker="x", ls="--", color=line[0].get_color(), label=f"{kind}: ess_init")
    left.set(ylabel="average ESS per channel", title="ESS at initialization (L = 128)")
    ax.set(ylabel="ESS / TSS", title="Utilization at initialization (L = 128)")
    for panel in (left, ax):
        panel.set_xscale("log", base=2)
        panel.set_xticks(STATES, [str(s) for s in STATES])
        panel.minorticks_off()
        panel.set_xlabel("TSS per channel (state size N)")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig("docs/figures/init_tss.png", dpi=110)


if __name__ == "__main__":
    main()
