"""Built-in plugins: one small file per trick, each registered with
`@launcher.registry.register("name")`. Every module in this package is imported by the
registry when plugins are first looked up, so a new file here needs no other wiring.
Plugins never import each other; they share facts through the run context."""
