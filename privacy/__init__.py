"""Differential privacy at a site: DP-SGD, accounting, the ledger, budgets, releases, audit."""

import logging

# Opacus calls logging.basicConfig() when imported (opacus/utils/module_utils.py). That gives
# the root logger a handler, and Flower's logger, which propagates to the root, then prints
# every line twice. Import Opacus once here and drop the handler it added.
_before = list(logging.getLogger().handlers)
import opacus  # noqa: E402,F401

for _handler in [h for h in logging.getLogger().handlers if h not in _before]:
    logging.getLogger().removeHandler(_handler)
