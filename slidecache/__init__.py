"""What every stage of slidecache shares, and nothing stage-specific.

The top-level packages are the commands users type (`python -m extract|store|train|evaluate|demo`); this
package is the library under all of them, and imports none of them:

    errors       the one error hierarchy (each error also a builtin: ValueError, KeyError, ...)
    cli_args     the rules every command line shares: booleans, --storage-options, error → exit code
    configs      where a config named on the command line is found (a checkout or a wheel install)
    devices      cores, GPUs and the torch device a run uses
    jsonl        reading JSON-lines files with line numbers in errors; json_out: strict JSON out
    cohorts/     what describes patients and cohorts: ids, slide tables, clinical tables, splits, reports
    heads/       fitted slide-level heads (MIL networks) as saved files and heatmaps: fitted by `evaluate`,
                 applied by `train.generate --slide`

`slidecache COMMAND ARGS` (the console script, see __main__) runs `python -m COMMAND ARGS`.
"""

import os
import tempfile

# cuFile (loaded by cuCIM and by CUDA builds of torch) writes cufile.log into the working directory unless
# told where: every process that imports our code (CLIs, Ray workers) keeps it in the temp folder instead.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.path.join(tempfile.gettempdir(), f"slidecache-cufile-{os.getuid()}.log"))
