"""The offline quickstart (`python -m larp.quickstart`, or `bash scripts/quickstart.sh` on a fresh machine): the
stages (run.py), the runner that overlaps them (stages.py), and the measurements and report (report.py)."""
