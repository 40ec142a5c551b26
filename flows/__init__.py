"""Prefect flows that orchestrate the dvc.yaml graph; the stages themselves live in components/."""
