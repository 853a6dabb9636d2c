"""Artifacts between stages: schemas, manifests, atomic stage folders and the reader of a run folder."""

from mmrec.artifacts.manifest import Manifest
from mmrec.artifacts.run import RunFolder, Stage
from mmrec.artifacts.schemas import read_table, write_table
from mmrec.artifacts.stage_output import stage_dir, stage_output, work_dir

__all__ = ["Manifest", "RunFolder", "Stage", "read_table", "stage_dir", "stage_output", "work_dir", "write_table"]
