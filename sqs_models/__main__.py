"""``python -m sqs_models`` == ``sqs-models``."""

from .cli import main

raise SystemExit(main())
