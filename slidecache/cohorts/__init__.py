"""What describes patients and cohorts, for every stage: TCGA ids and the patient key (ids), which slides a
cohort has (slides), outcomes (clinical), who is in which fold or set (splits), InternVL's --meta_path JSON
(meta) and the report datasets users bring (reports)."""
