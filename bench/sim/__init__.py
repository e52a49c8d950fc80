"""Cluster-scale discrete-event simulator driving the real placement ranking and PipelineCache."""
