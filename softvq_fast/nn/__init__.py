"""Drop-in modules built on softvq_fast ops."""
