"""Ray Data helpers: a DataFrame's rows as a Dataset of blocks, and a Dataset's rows back with a progress bar."""
from __future__ import annotations

import pandas as pd
import ray

def row_blocks(df: pd.DataFrame, size: int):
    """A Ray Dataset of ``df``'s rows in blocks of about ``size`` rows: one task each, so every worker gets a
    share. Built in the driver: ``from_pandas`` would run a remote task per block just to read its schema."""
    return ray.data.from_items(df.to_dict("records"), override_num_blocks=max(1, -(-len(df) // size)))


def rows_with_progress(ds, total: int, desc: str) -> pd.DataFrame:
    """A Ray Dataset's rows as one DataFrame, with a tqdm bar that advances as its batches arrive."""
    from tqdm.auto import tqdm
    parts = []
    with tqdm(total=total, desc=desc, unit="model") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            parts.append(batch)
            bar.update(len(batch))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
