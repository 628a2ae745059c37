"""Convert time and peak memory: a full-size 345M NGC-format zip to a Hugging Face folder.

    python benchmarks/convert.py [--work /tmp/mbexport-bench] [--deflate]

The zip is built once (seeded random fp32 weights, no args, pre-1.6 pickle, like the NGC release) and
``mbexport convert`` runs in a fresh process whose wall time and peak RSS are measured from outside.
Targets (issue 6): at most 7.1 s and 1.67 GB on the 2-core reference machine; the weights alone are 1.34 GB.
"""

from __future__ import annotations

import resource
import shutil
import zipfile

from common import CONFIG_345M, arguments, child, environment, measured, save

TARGET_SECONDS, TARGET_GB = 7.1, 1.67

BUILD = """
import zipfile
from mbexport.checkpoint.example import random_state_dict, write_ngc_zip
from mbexport.config import MegatronBertConfig
config = MegatronBertConfig(**{config!r})
write_ngc_zip({path!r}, random_state_dict(config, seed=0), config, compression={compression})
"""


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--deflate", action="store_true", help="deflate the .pt member (default: stored)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    compression = zipfile.ZIP_DEFLATED if args.deflate else zipfile.ZIP_STORED
    archive = args.work / f"megatron_bert_345m_random_{'deflated' if args.deflate else 'stored'}.zip"
    if not archive.is_file():
        config = {k: getattr(CONFIG_345M, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                        "num_attention_heads", "intermediate_size",
                                                        "max_position_embeddings")}
        child(["-c", BUILD.format(config=config, path=str(archive), compression=compression)])
    out = args.work / "converted-345m"
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = measured(["-m", "mbexport", "convert", str(archive), "--out", str(out)])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds say what wall time would be on an idle machine (minus waiting for the disk).
    result["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    report = {"benchmark": "convert", "checkpoint": archive.name, "checkpoint_gb": archive.stat().st_size / 1e9,
              **result, "target_seconds": TARGET_SECONDS, "target_peak_rss_gb": TARGET_GB,
              "within_target": result["seconds"] <= TARGET_SECONDS and result["peak_rss_gb"] <= TARGET_GB,
              "environment": environment()}
    print(f"convert {archive.name} ({report['checkpoint_gb']:.2f} GB): {result['seconds']:.1f} s wall, "
          f"{result['cpu_seconds']:.1f} s CPU, {result['peak_rss_gb']:.2f} GB peak RSS "
          f"(target {TARGET_SECONDS} s, {TARGET_GB} GB)")
    print(f"wrote {save(args.work, 'convert.json', report)}")


if __name__ == "__main__":
    main()
