"""The job file and the rows: the job schema and its checks against the data, tables on
storage, row math, synthetic data sets, mini-batch sampling and the Ray Data source."""
