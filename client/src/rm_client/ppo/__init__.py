"""PPO against the reward service (`rm-ppo`); needs the `[ppo]` extra (torch, transformers)."""
