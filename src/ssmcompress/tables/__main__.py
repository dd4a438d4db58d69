from ssmcompress.tables import cli

cli()
