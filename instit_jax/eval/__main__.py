from instit_jax.eval.cli import main

main()
