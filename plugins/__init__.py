"""graphopt's built-in plugins: each module registers through the ``graphopt`` entry-point
group exactly as a third-party package would."""
