//! The kernel's CAN frame constants (`linux/can.h`), in one place for every module that reads or
//! writes frames: the raw sockets, the tunnel's wire format, the buses' receive filters.

/// `canid_t` flag: extended (29-bit) identifier.
pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
/// `canid_t` flag: remote transmission request.
pub const CAN_RTR_FLAG: u32 = 0x4000_0000;
/// `canid_t` flag: error message frame.
pub const CAN_ERR_FLAG: u32 = 0x2000_0000;
/// The bits of a standard (11-bit) identifier.
pub const CAN_SFF_MASK: u32 = 0x0000_07FF;
/// The bits of an extended (29-bit) identifier.
pub const CAN_EFF_MASK: u32 = 0x1FFF_FFFF;
/// CAN FD flag: bit rate switch.
pub const CANFD_BRS: u8 = 0x01;
/// CAN FD flag: error state indicator.
pub const CANFD_ESI: u8 = 0x02;
/// Most data bytes of a classic frame.
pub const CAN_MAX_DLEN: usize = 8;
/// Most data bytes of a CAN FD frame.
pub const CANFD_MAX_DLEN: usize = 64;
/// Size of the kernel's `struct can_frame`, what a CAN_RAW socket reads and writes for classic
/// frames.
pub const CAN_MTU: usize = 16;
/// Size of the kernel's `struct canfd_frame`, what a CAN_RAW socket with `CAN_RAW_FD_FRAMES`
/// reads and writes for CAN FD frames.
pub const CANFD_MTU: usize = 72;
