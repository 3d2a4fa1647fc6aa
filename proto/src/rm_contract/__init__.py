"""The contracts every part of rewardserve imports, and nothing else (docs/architecture.md).

- The wire: `rm_contract.pb`, the stubs generated from proto/reward/v1/reward.proto (package reward.v1).
- The artifact: `bundle` (bundle.json, format version, hashes, loading and verifying a bundle's files),
  `recipe` (how a sample becomes token ids: templates, chat rendering, truncation) and `padding` (how id
  sequences become a batch). Training writes a bundle with these; the server reads it with the same code.
- The data: `records`, the one parser of the preference and scoring data formats.
- The command lines: `config_cli` (one flag per config field) and `backbones` (bundled pretrained weights).

It depends on grpcio, protobuf, tokenizers, jinja2 and numpy only: never on torch, onnxruntime or the
other rewardserve packages.
"""
