import click


@click.command()
def train() -> None:
    """(being written)"""
