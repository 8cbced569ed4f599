"""Evaluate a model offline: a local lm-eval YAML task (examples/eval_task) and the cloze check on a text file.

python examples/evaluate.py [MODEL]   # default: the bundled demo model

The cloze check needs no lm-eval; the YAML task needs the `eval` extra (pip install "openelm-mlx[eval]").
"""

import sys
import tempfile
from pathlib import Path

from openelm_mlx.evaluate.cloze import evaluate_cloze
from openelm_mlx.evaluate.harness import OpenELMLM, evaluate_tasks, load_model

TASK = Path(__file__).resolve().parent / "eval_task" / "next_line.yaml"
TEXT = """\
ROMEO:
But soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green
And none but fools do wear it; cast it off.
It is my lady, O, it is my love!
O, that she knew she were!
She speaks yet she says nothing: what of that?
Her eye discourses; I will answer it.
"""

model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
lm = OpenELMLM(model, tokenizer, batch_size=16, progress=False)
results = evaluate_tasks(lm, [str(TASK)])
metrics = results["results"]["shakespeare_next_line"]
print(f"{TASK.name}: acc {metrics['acc,none']:.3f}, acc_norm {metrics['acc_norm,none']:.3f}")

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "romeo.txt"
    path.write_text(TEXT)
    cloze = evaluate_cloze(model, tokenizer, path, seed=0)
print(f"cloze on {cloze.items} lines: acc {cloze.acc:.3f}, acc_norm {cloze.acc_norm:.3f}, acc_mi {cloze.acc_mi:.3f}")
