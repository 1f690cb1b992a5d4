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
        launch_server(args)
    except RuntimeError as e:
        logging.getLogger("nanocp").error("%s", e)
        sys.exit(1)
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
        pass


if __name__ == "__main__":
    main()
