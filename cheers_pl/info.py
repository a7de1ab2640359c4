"""``cheers flavors`` and ``cheers info``: what the registry holds and what a preset weighs."""

from __future__ import annotations

from cheers_pl.cli_help import make_parser


def main_flavors(argv: list[str] | None = None) -> int:
    """Print every component kind and its flavors."""
    make_parser("cheers flavors", "list component kinds and flavors").parse_args(argv)
    from cheers_pl import registry

    for kind in registry.kinds():
        table = registry.COMPONENTS[kind]
        print(f"{kind:18s} " + ", ".join(f"{n} ({f.doc})" if f.doc else n for n, f in table.items()))
    return 0


def main_info(argv: list[str] | None = None) -> int:
    """Resolve a preset spec, build it on the meta device (no memory) and print its sizes."""
    parser = make_parser("cheers info", main_info.__doc__)
    parser.add_argument("--preset", choices=["tiny", "paper"], default="paper", help="the spec preset")
    parser.add_argument(
        "--hfi",
        choices=["gated", "none"],
        default="gated",
        help="high-frequency injection: gated (paper) or none (ablation)",
    )
    parser.add_argument(
        "--pixel-reconstruct",
        choices=["decode", "latent"],
        default="decode",
        help="decode: z_t -> VAE decoder -> SigLIP (the paper); latent: TUNA-style ablation",
    )
    args = parser.parse_args(argv)
    import torch

    from cheers_pl.model import CheersModel, parameter_summary
    from cheers_pl.spec import CheersSpec

    spec = getattr(CheersSpec, args.preset)(hfi=args.hfi, pixel_reconstruct=args.pixel_reconstruct)
    with torch.device("meta"):
        model = CheersModel(spec)
    side, channels, n = model.latent_side, model.latent_channels, model.tokens_per_image
    print(f"image {model.image_size}px -> z1 ({channels}, {side}, {side}); {n} LLM tokens")
    for name, total, trainable in parameter_summary(model):
        print(f"{name:18s} {total:>15,d} params  {trainable:>15,d} trainable")
    return 0
