"""Analyses of trained models and fault campaigns, one module per analysis.

* ``value_ranges`` and ``top2diff_sweep``: the paper's Figures 3 and 4 (CLI: ``analyze.py``);
* ``ablation`` with ``pipeline``: the initialisation ablation of Table 3 as resumable command lines;
* ``cam``, ``faults_for_cam``, ``cam_compare`` and ``cam_figure``: Ablation-CAM of a baseline and a
  text-guided model before and after the same faults (CLI: ``visualize.py``, docs/visualize.md).
"""
