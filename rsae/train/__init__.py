"""Training: the LightningModules of every stage, calibration and the `RemezInit` callback."""

from rsae.train.calibration import CalibrationReport, calibrate, evaluate_against_teacher
from rsae.train.modules import Evaluation, FineTuning, GateCalibration, SAEModule, TeacherTraining
from rsae.train.remez_init import RemezInit

__all__ = ["CalibrationReport", "Evaluation", "FineTuning", "GateCalibration", "RemezInit", "SAEModule",
           "TeacherTraining", "calibrate", "evaluate_against_teacher"]
