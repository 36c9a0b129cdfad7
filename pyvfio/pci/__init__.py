"""PCI config space and capabilities, shared by host inspection, kernel devices
and emulated (vfio-user) devices."""
