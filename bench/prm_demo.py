"""The serving step of `make demo-prm`: a process reward model bundle served by rm-serve, held-out solutions
scored through gRPC in one request and one by one, against the checkpoint's PyTorch forward.

    .venv/bin/python bench/prm_demo.py --bundle runs/demo-prm/bundle --checkpoint runs/demo-prm/rm \
        --data rm_training/data/demo_prm/test.jsonl

Prints the served step accuracy and first-error accuracy on the held-out rows, the largest difference of a
served step score from PyTorch's, and of a step batched with the others from the same step sent alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rm_client.client import RewardClient
from rm_contract.recipe import Sample
from rm_contract.records import load_step_solutions
from rm_server.launch import start_server, stop_server
from rm_training.model import load_reward_model, sample_encoder
from rm_training.prm_metrics import step_metrics


@torch.no_grad()
def torch_step_scores(checkpoint: str, solutions) -> list[np.ndarray]:
    model, tokenizer, metadata = load_reward_model(checkpoint)
    encoder = sample_encoder(tokenizer, metadata.recipe)
    scores = []
    for solution in solutions:
        encoded = encoder.encode(Sample.from_steps(solution.prompt, solution.steps))
        ids = torch.tensor([encoded.ids])
        scores.append(model.eval()(ids, torch.ones_like(ids))[0, list(encoded.steps)].double().numpy())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint the bundle was exported from")
    parser.add_argument("--data", required=True, help="held-out process-reward rows (prompt, completions, labels)")
    parser.add_argument("--rows", type=int, default=200, help="rows scored (one by one too)")
    args = parser.parse_args()
    solutions = load_step_solutions(args.data)[: args.rows]
    prompts, steps = [s.prompt for s in solutions], [list(s.steps) for s in solutions]

    with tempfile.TemporaryDirectory() as logs:
        try:
            server = start_server(args.bundle, Path(logs) / "serve.log", metrics=False)
        except RuntimeError as e:  # it exited or never served: the message ends with its log
            sys.exit(str(e))
        try:
            with RewardClient(server.target, timeout_s=600) as client:
                batched = client.score_steps(prompts, steps).steps
                alone = [client.score_steps([p], [s]).steps[0] for p, s in zip(prompts, steps)]
        finally:
            stop_server(server)

    reference = torch_step_scores(args.checkpoint, solutions)
    labels = [np.array(s.labels, dtype=bool) for s in solutions]
    metrics = step_metrics(batched, labels)
    vs_torch = max(float(np.abs(b - r).max()) for b, r in zip(batched, reference))
    vs_alone = max(float(np.abs(b - a).max()) for b, a in zip(batched, alone))
    print(json.dumps({"served": metrics, "max_abs_vs_pytorch": vs_torch, "max_abs_batched_vs_alone": vs_alone}))
    print(
        f"served {len(solutions)} held-out solutions ({metrics['n_steps']} steps): step accuracy "
        f"{metrics['step_accuracy']:.4f}, first-error accuracy {metrics['first_error_accuracy']:.4f}; "
        f"served vs PyTorch max |diff| {vs_torch:.1e}, batched vs alone {vs_alone:.1e}"
    )
    if not (vs_torch <= 1e-4 and vs_alone <= 1e-4):
        sys.exit("served step scores differ from PyTorch or from themselves alone by more than 1e-4")


if __name__ == "__main__":
    main()
