"""Real QEMU guests: the guest image (`image`), the QEMU process under QMP (`machine`) and
the guest's own record of the input it received (`journal`). See DESIGN.md §8."""
