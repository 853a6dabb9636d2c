"""``mmrec pipeline``'s machinery: the steps a pipeline YAML names, whether each is up to date, running one
as its own command, and the closing comparison of the tested models. The command line is
:mod:`mmrec.stages.pipeline`."""
