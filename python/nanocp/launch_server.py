"""`python -m nanocp.launch_server [--model-path DIR] [flags]`: the NanoCP HTTP server.

Without --model-path it serves a small demo MoE model (created on first run) on the CPU.
Heavy imports happen inside main(): child processes re-import this module when they start.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> None:
    from nanocp.server_args import ServerArgs

    args = ServerArgs.parse(argv, prog="python -m nanocp.launch_server")
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.model_path is None:
        from nanocp.server.demo_model import DEMO_NAME, demo_model_path

        path = demo_model_path()
        args = args.replace(
            model_path=path,
            tokenizer_path=args.tokenizer_path or path,
            served_model_name=args.served_model_name or DEMO_NAME,
            device=args.device if "--device" in (argv or sys.argv) else "cpu",
        )
    from nanocp.server.launch import launch_server

    try:
        if args.dry_run:  # every flag is checked by now; the model's split and node 0's address here
            dry_run(args)
            return
        launch_server(args)
    except RuntimeError as e:
        logging.getLogger("nanocp").error("%s", e)
        sys.exit(1)
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
        pass


def dry_run(args) -> None:
    """Check what can be checked before starting (the model's expert split, node 0's address)
    and print the plan: which node runs what, the ports, this node's GPUs."""
    import socket

    from nanocp.server.launch import check_layout

    check_layout(args)
    layout = args.layout
    if layout.multinode:
        try:
            socket.getaddrinfo(layout.host, layout.base_port)
        except OSError as e:
            raise RuntimeError(
                f"--dist-init-addr {args.dist_init_addr}: {layout.host!r} does not resolve ({e})"
            ) from e
    print(f"{args.model_path}: dp {args.dp_size}, ep {args.ep_size}, cp {args.cp_policy}")
    print(layout.describe())
    local = len(layout.local_instances)
    if args.device == "cuda" and local:
        import torch

        gpus = torch.cuda.device_count()
        shared = " (instances share GPUs)" if gpus < local else ""
        print(f"  this node: {local} instance(s) on {gpus} visible GPU(s){shared}")


if __name__ == "__main__":
    main()
