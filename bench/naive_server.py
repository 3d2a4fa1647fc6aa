"""A reward server of the kind trainers call today, as the baseline (modelled on OpenRLHF's remote reward server).

HTTP + JSON, transformers eager in PyTorch, each request scored alone (no cross-request batching); its
own samples are batched together, as OpenRLHF's server does. Request: {"pairs": [[prompt, response], ...]};
answer: {"rewards": [...]}. The same input recipe as the bundle, so only the serving differs.

    python bench/naive_server.py --model runs/demo/rm --port 5000
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from rm_contract.recipe import Sample
from rm_training.batching import pad
from rm_training.model import load_reward_model, sample_encoder


def make_handler(model, encoder, pad_id: int, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = [encoder.encode(Sample.from_text(p, r)).ids for p, r in body["pairs"]]
            with lock, torch.no_grad():  # one request at a time on the model, like a single uvicorn worker
                rewards = model(*pad(ids, pad_id)).tolist()
            payload = json.dumps({"rewards": rewards}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reward-model checkpoint directory")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    model, tokenizer, metadata = load_reward_model(args.model)
    model.eval()
    handler = make_handler(model, sample_encoder(tokenizer, metadata.recipe), tokenizer.pad_token_id, threading.Lock())
    ThreadingHTTPServer.request_queue_size = 256  # accept the benchmark's 64 concurrent clients
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"naive server on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
