"""Static-shape top-k routing: options, the routing primitive, the MoD and DTF scan units, dense
to routed transfer and FLOP counts. Import the submodules directly (`jaxdyn.model` registers
the units)."""
