"""Self-contained HTML reports (:mod:`.export`) and the index of a run with its headline tables (:mod:`.index`)."""
from hmlib.reports.export import (HIDE_INPUT_TAG, HIDE_OUTPUT_TAG, REMOVE_CELL_TAG, WIDGET_STATE, WIDGET_VIEW,
                                  ReportError, export_html, notebook_title, utc_now, write_text_file)
from hmlib.reports.index import (RUN_LOG_NAME, NotebookRecord, headlines_dir, read_headlines, read_run_log,
                                 record_headline, run_log_path, update_run_log, write_index)

__all__ = [
    "HIDE_INPUT_TAG", "HIDE_OUTPUT_TAG", "REMOVE_CELL_TAG", "WIDGET_STATE", "WIDGET_VIEW", "RUN_LOG_NAME",
    "ReportError", "NotebookRecord", "export_html", "write_text_file", "notebook_title", "record_headline",
    "read_headlines", "headlines_dir", "read_run_log", "update_run_log", "write_index", "run_log_path", "utc_now",
]
