"""The training data stream: documents -> lanes -> packed batches, resumable at any world size.

Which module holds what:

    readers.py        one reader per file format (.jsonl, .jsonl.zst, .parquet, .txt); the globs naming files
    sources.py        the epoch order of a local source or a Hub dataset (cached once per node, or streamed)
    encoding.py       documents -> [bos] ids [eos] token arrays; the tokenizer's identity and share of cores
    cache.py          the token cache (the training documents tokenized once), read back by index: what its
                      folder holds, TokenCache, load_token_cache and open_token_cache
    cache_build.py    the cache's build, with every core, into a folder renamed into place (build_token_cache)
    cache_manifest.py what a cache was made from (manifest.json), and whether that matches the config
    prepare.py        `python -m dist_llama.data.prepare --config X.yaml`: build the token cache beforehand
    packing.py        the lanes, and the one packer that cuts their tokens into windows (LanePacker)
    token_sources.py  where a lane's next documents come from: a source's text tokenized on a worker thread
                      (TokenizingSource), or the token cache (CachedTokenSource)
    loader.py         PackedBatches, its prefetch thread, and the state that checkpoints carry (merge_states)
    heldout.py        the held-out split and the validation batches

Why lanes. A loader that deals documents to ranks (rank r takes every W-th document, or one shard per rank)
encodes the world size W in its state, so a checkpoint cannot resume on a different number of GPUs without
replaying or skipping data; torchtitan's loader has this limitation. Here the unit of ownership is a lane,
not a rank. A global batch has `global_rows` rows, and there are exactly `global_rows` lanes:

    epoch order of documents (seeded)  d = 0, 1, 2, ...
    lane l owns documents d with d % global_rows == l, and packs them alone:
        [bos] doc_l [eos] [bos] doc_{l+N} [eos] ...  cut into windows of seq_len + 1 tokens,
        consecutive windows overlapping by one token, so every token is a target exactly once
    row l of every global batch is lane l's next window
    rank r of W holds the lanes l with l % W == r

A lane's state is three integers (epoch, document index, token offset), independent of W. A checkpoint keeps
every lane's state (the trainer all-gathers the ranks' dicts with `merge_states`), and any world size that
divides `global_rows` can pick its own lanes out of it: the global token stream (row l of step s) is the same
for every W, and a resumed run continues it exactly.

Each rank tokenizes only its own lanes' documents, in batches, on a background thread that runs
`data.prefetch_steps` batches ahead; the Rust tokenizer releases the GIL. The thread's timing never changes
the output: one producer makes the batches in order, and each batch carries the lane states as of that batch.
A rank reads only its own lanes' records, from each lane's resume point on: a local file is loaded whole but
only those records are parsed, and a Hub dataset is, by default, downloaded once per node into `datasets`'
cache (memory-mapped Arrow with random access; local rank 0 downloads while the node's other ranks wait), so
a resume seeks rather than re-reads. Its epoch order is a seeded permutation of every row. With
`data.hub_streaming` it is streamed instead (for datasets too large for the disk): there is no random access,
every rank reads the whole stream, the order comes from a shuffle buffer, and a resume re-reads (without
tokenizing) its epoch up to the slowest lane.

With `data.token_cache` (a folder) no tokenizer runs under training: the documents' tokens are read by index
from the cache (numpy.memmap), which `python -m dist_llama.data.prepare`, or else each node's local rank 0 on
first use, builds once with every core. The packer is the same one either way: it asks a token source for a
lane's next documents, and both sources give a lane the same documents in the same order (the same epoch
order, lanes and state), differing only in where the tokens come from. So the batches are identical bit for
bit to tokenizing on the fly, and a checkpoint of either resumes on the other.

The held-out set is either `data.val_paths` or, without them, the documents whose blake2b text hash falls
below `data.val_per_mille` / 1000; the training stream then skips every such document.

The lane states index documents by their place in an epoch, so they only mean something for the data they
were saved with: the state also records the source (local file names and sizes, or the Hub dataset, split,
resolved revision and fingerprint, and the text field), and loading it into a run that reads another source
fails.

Costs of the design. Lanes drift apart: a lane of long documents is at a lower document index than a lane of
short ones, and the spread grows like the square root of the steps taken. The stream is read as far as the
fastest lane needs, and the slower lanes' documents wait in memory as text (they are tokenized only when
their lane is a few windows from running dry). Local files allow a seek by whole files on resume.
"""

# The public names. The tunables (TOKENIZE_BATCH_DOCS, HUB_CHUNK_ROWS, ...) are not re-exported: a copy here
# would not be the value the module that uses it reads, so set them on that module.
from dist_llama.data.cache import load_token_cache, open_token_cache
from dist_llama.data.cache_build import build_token_cache
from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.heldout import (
    cut_windows,
    held_out_documents,
    held_out_files,
    is_held_out,
    token_stream,
    validation_batches,
)
from dist_llama.data.loader import PackedBatches, merge_states
from dist_llama.data.readers import FORMATS, expand_paths, iter_documents, read_documents

__all__ = [
    "FORMATS",
    "DocumentEncoder",
    "PackedBatches",
    "build_token_cache",
    "cut_windows",
    "expand_paths",
    "held_out_documents",
    "held_out_files",
    "is_held_out",
    "iter_documents",
    "load_token_cache",
    "merge_states",
    "open_token_cache",
    "read_documents",
    "token_stream",
    "validation_batches",
]
