"""``python -m qwen3_pipeline.demo``: run the demo job (``make demo``)."""

from qwen3_pipeline.demo.run import main

raise SystemExit(main())
