"""RL post-training (paper §3.3; DESIGN §5): DiffusionNFT with pluggable rewards.

    nft.py       the DiffusionNFT objective and the old-policy schedule, as pure functions
    rewards.py   the Reward interface and registry: PickScore, the tiny profile's Shapes reward
    rollout.py   prompts from the cache (contexts cached or encoded online) and their noise; packing,
                 the Euler sampler and decoding are loomcore.models.packed (training's and validation's)
    trainer.py   the online loop (torchrun + FSDP2, checkpoints, dvclive), `train_rl`
"""
